"""lumireg: deformable registration of brain MRI as a service.

The folders of the repository import as ``lumireg.<folder>``: ``kernels``
(Triton GPU kernels with PyTorch twins), ``network``, ``train``, ``evaluate``,
``export``, ``service``, ``client`` and ``benchmarks``. Importing ``lumireg``
itself imports none of them, so the light client install stays free of torch.
"""

__version__ = "0.1.0"
