"""The gRPC client library and the ``lumireg register`` command. Needs no torch.

```python
from lumireg.client import RegistrationClient
with RegistrationClient("localhost:8001") as client:
    result = client.register("fixed.nii.gz", "moving.nii.gz", outputs=("displacement", "warped", "qc"))
    result.save("out/")
```
"""

from lumireg.client.registration import (  # noqa: F401
    InputError,
    LumiregError,
    RegistrationClient,
    RegistrationResult,
    ServerUnavailable,
)
