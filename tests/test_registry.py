"""Client slots: a claim is checked, and a slot whose holder is gone can be taken again (a
restarted SuperNode, or a run resumed under `flwr run`, comes back under new node ids)."""

from strategies import NodeRegistry


def test_a_slot_held_by_a_connected_node_is_refused_to_another_claimant():
    reg = NodeRegistry(capacity=2)
    assert reg.admit(1, 0, connected={1}) == (0, "")
    idx, why = reg.admit(2, 0, connected={1, 2})
    assert idx is None and "already held by node 1" in why


def test_a_slot_whose_holder_is_gone_goes_to_its_next_claimant():
    """Naively the old id keeps the slot: a resumed run refused every fresh node
    ("partition-id 0 is already held by node <old id>") and waited for 10 minutes."""
    reg = NodeRegistry(capacity=2)
    reg.admit(1, 0, connected={1})
    reg.admit(2, 1, connected={1, 2})
    assert reg.admit(11, 0, connected={11, 12}) == (0, "")
    assert reg.admit(12, 1, connected={11, 12}) == (1, "")
    assert reg.index == {11: 0, 12: 1}


def test_a_node_without_a_claim_gets_a_free_slot_or_an_absent_holders():
    reg = NodeRegistry(capacity=2)
    reg.admit(1, None, connected={1})
    reg.admit(2, None, connected={1, 2})
    assert reg.admit(3, None, connected={1, 2, 3})[0] is None  # all present: no slot
    assert reg.admit(4, None, connected={2, 4}) == (0, "")  # node 1 is gone
