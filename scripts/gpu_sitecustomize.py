"""sitecustomize for a lent GPU box (scripts/gpu_site.sh copies it to .gpu_site/sitecustomize.py;
Python imports it at start-up because scripts/gpu_run.sh puts .gpu_site on PYTHONPATH).

Flower imports `cryptography` at module level for SuperNode auth and secure aggregation, which an
in-process run (`python -m benchmarks.sweep --engine inprocess`) never calls. Where its compiled
part cannot load (no cffi wheel for that Python), placeholders that fail only when called let the
apps import. CRYPTOGRAPHY_STUBBED says why they were needed, or is None when the real package works.
"""

import sys
import types


def _stub_cryptography_if_unusable() -> str | None:
    try:
        from cryptography.hazmat.primitives.asymmetric import ec  # noqa: F401

        return None
    except Exception as exc:  # noqa: BLE001 - any failure to load it is the case handled here
        reason = f"{type(exc).__name__}: {exc}"

    class Missing(types.ModuleType):
        __path__: list[str] = []  # a package, so `import a.b` finds b in sys.modules

        def __getattr__(self, attr: str):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return Missing(f"{self.__name__}.{attr}")

        def __call__(self, *a, **k):
            raise RuntimeError(f"{self.__name__} is unavailable: cryptography could not load ({reason})")

    for name in [k for k in sys.modules if k.split(".")[0] == "cryptography"]:
        del sys.modules[name]
    for sub in ("", ".exceptions", ".fernet", ".x509", ".x509.oid", ".hazmat", ".hazmat.primitives",
                ".hazmat.primitives.hashes", ".hazmat.primitives.serialization", ".hazmat.primitives.asymmetric",
                ".hazmat.primitives.asymmetric.ec", ".hazmat.primitives.kdf", ".hazmat.primitives.kdf.hkdf"):
        name = "cryptography" + sub
        sys.modules[name] = Missing(name)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, sys.modules[name])
    print(f"warning: cryptography cannot load ({reason}); Flower's auth imports get placeholders", file=sys.stderr)
    return reason


CRYPTOGRAPHY_STUBBED = _stub_cryptography_if_unusable()
