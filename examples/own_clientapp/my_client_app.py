"""A ClientApp of your own that speaks CollaFuse's protocol, built from `collafuse_flwr.node` alone:
it answers `query.hello` (or it is never admitted), `train.collafuse` and `evaluate.collafuse`, chooses
its own cut step and upload budget, and draws fresh OS entropy for every noise it releases."""

import torch
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from collafuse_flwr import protocol as P
from collafuse_flwr.core.diffusion import make_schedule
from collafuse_flwr.core.models import build_denoiser
from collafuse_flwr.core.training import make_optimizer
from collafuse_flwr.node import (check_handoff, check_train_request, finish, fresh_generator, make_upload, reply,
                                 train_share)

T, CUT, BUDGET, STEPS, BATCH = 20, 10, 8, 2, 16  # this node's choices: its cut step is its own
SCHED = make_schedule(T, "cosine")
app = ClientApp()


def my_images(context: Context) -> torch.Tensor:
    """This node's training images in [-1, 1] (here: random blobs; yours come from your disk)."""
    g = torch.Generator().manual_seed(int(context.node_id) % 1000)
    return (torch.rand((32, 1, 8, 8), generator=g) * 2 - 1).clamp(-1, 1)


def my_model(context: Context) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = build_denoiser(8, 1, "tiny")
    if "my-model" in context.state.array_records:
        model.load_state_dict(context.state.array_records["my-model"].to_torch_state_dict())
    return model, make_optimizer(model, 2e-3)


@app.query(P.HELLO)
def hello(msg: Message, context: Context) -> Message:
    return reply(msg, {P.PARTITION_ID: -1, P.NUM_EXAMPLES: len(my_images(context)), P.CUT_STEP: CUT,
                       P.UPLOAD_BUDGET: BUDGET})


@app.train(P.COLLAFUSE)
def train(msg: Message, context: Context) -> Message:
    n_up = check_train_request(msg.content[P.CONFIG], cut_step=CUT, upload_budget=BUDGET)  # raises Refused
    images, (model, opt), gen = my_images(context), my_model(context), fresh_generator()
    loss = train_share(model, opt, images, SCHED, CUT, STEPS, BATCH, gen, torch.device("cpu"))
    context.state["my-model"] = ArrayRecord(model.state_dict())
    _, x_tc = make_upload(images, SCHED, CUT, n_up, gen)
    return reply(msg, {P.NUM_EXAMPLES: len(images), P.TRAIN_LOSS: loss},
                 **{P.UPLOAD: ArrayRecord({P.X_TC: Array(x_tc.numpy())})})


@app.evaluate(P.COLLAFUSE)
def evaluate(msg: Message, context: Context) -> Message:
    x = check_handoff(msg.content[P.HANDOFF][P.X_TC].numpy(), image_shape=(1, 8, 8), max_samples=64)
    model, _ = my_model(context)
    images = finish(model, SCHED, x, CUT, None, fresh_generator(), torch.device("cpu"))
    return reply(msg, {P.NUM_EXAMPLES: len(images)})
