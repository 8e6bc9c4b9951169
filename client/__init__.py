"""The gRPC client library and the ``lumireg register`` command. Needs no torch.

```python
from lumireg.client import RegistrationClient
with RegistrationClient("localhost:8001") as client:
    result = client.register("fixed.nii.gz", "moving.nii.gz", outputs=("displacement", "warped", "qc"))
    result.save("out/")
```
"""

__all__ = [
    "AccessDenied",
    "Credentials",
    "InputError",
    "LumiregError",
    "RegistrationClient",
    "RegistrationResult",
    "ServerUnavailable",
]


def __getattr__(name: str):
    # imported on first use, so `lumireg --help` and `lumireg.client.command` stay light
    if name in __all__:
        from lumireg.client import registration

        return getattr(registration, name)
    raise AttributeError(f"module 'lumireg.client' has no attribute {name!r}")
