"""Fixtures of the hospital-grade tests: a throw-away CA, an access key, LUMIR-shaped image files, pairs files,
the client's request attempts."""

import os
import secrets
import sys
import threading
from pathlib import Path

import nibabel as nib
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # certificates.py beside this file (pytest runs in importlib mode)

from certificates import make_certificates  # noqa: E402

from lumireg.client.transport import GrpcTransport, SharedMemoryTransport  # noqa: E402

LUMIR_NAMES = ("LUMIRMRI_3455_0000.nii.gz", "LUMIRMRI_3456_0000.nii.gz")


@pytest.fixture(scope="session")
def certificates(tmp_path_factory) -> dict[str, Path]:
    """PEM files of a throw-away CA: ``ca``, ``server_cert``/``server_key`` (localhost, 127.0.0.1),
    ``client_cert``/``client_key``, and ``other_ca`` (trusted by nobody)."""
    return make_certificates(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def access_key() -> str:
    return secrets.token_hex(24)


@pytest.fixture(scope="session")
def access_key_file(tmp_path_factory, access_key) -> Path:
    path = tmp_path_factory.mktemp("keys") / "lumireg.key"
    path.write_text(access_key + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="session")
def lumir_pair_files(pair, tmp_path_factory) -> tuple[Path, Path]:
    """The test pair as two LUMIR NIfTI files (uint8 on the canvas, sent to the server as they are)."""
    from lumireg.train.canvas import lumir_canvas

    root = tmp_path_factory.mktemp("images")
    affine = lumir_canvas().affine
    paths = []
    for name, image in zip(LUMIR_NAMES, (pair["fixed"][0, 0], pair["moving"][0, 0])):
        paths.append(root / name)
        nib.save(nib.Nifti1Image(image, affine), str(paths[-1]))
    return tuple(paths)


@pytest.fixture
def pairs_csv(tmp_path, lumir_pair_files):
    """``pairs_csv(n)``: the path of a CSV of ``n`` pairs with distinct LUMIR names (the fixed image against links
    to the moving one, so each pair writes its own folder), in a fresh folder under the test's ``tmp_path``."""
    fixed, moving = lumir_pair_files
    made = [0]

    def write(n: int) -> str:
        made[0] += 1
        folder = tmp_path / f"pairs{made[0]}"
        folder.mkdir()
        rows = []
        for k in range(n):
            name = folder / f"LUMIRMRI_{3600 + k}_0000.nii.gz"
            os.symlink(moving, name)
            rows.append(f"{fixed},{name}")
        (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
        return str(folder / "pairs.csv")

    return write


@pytest.fixture
def attempts(monkeypatch):
    """Every request attempt the client makes (either transport), in order: ``"ok"`` or its gRPC status."""
    seen, lock = [], threading.Lock()

    def counting(real):
        def counted(self, *args, **kwargs):
            try:
                answer = real(self, *args, **kwargs)
            except Exception as exc:
                with lock:
                    seen.append(str(exc.status()) if hasattr(exc, "status") else type(exc).__name__)
                raise
            with lock:
                seen.append("ok")
            return answer

        return counted

    for transport in (GrpcTransport, SharedMemoryTransport):
        monkeypatch.setattr(transport, "infer", counting(transport.infer))
    return seen
