"""Compressed transfer syntaxes are stored byte-exact, in the syntax they arrived in.

Samples are pydicom's bundled test files (JPEG baseline/extended/lossless, JPEG-LS,
JPEG 2000, RLE, deflate). Each test sends a copy whose Study, Series and SOP Instance
UIDs are renumbered in place (same length, so every other byte of the file is kept) so
that samples sharing UIDs and repeated sends do not collide on the one node this module
shares. A deflated dataset is inflated, renumbered and deflated again.

Three senders:

* ``raw``: pynetdicom with ``STORE_SEND_CHUNKED_DATASET``, proposing only the file's
  transfer syntax; it sends the file's dataset bytes as they are, so the stored
  dataset must equal the file's byte for byte.
* ``storescu``: DCMTK, told to propose the file's syntax. storescu re-encodes the
  dataset it read (explicit sequence lengths, padding), so the reference for the bytes
  on the wire is what DCMTK's storescp in bit-preserving mode (``+B``) stores for the
  same send.
* ``pacsnode-send``: the node's own ``send`` command.
"""

from __future__ import annotations

import secrets
import struct
import subprocess
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom import AE, _config

from tests.conftest import (
    NodeProcess,
    dcmtk_env,
    free_port,
    require_tool,
    wait_for_port,
)

# storescu option that proposes each transfer syntax (plus the uncompressed ones).
STORESCU_OPTION = {
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG Baseline (8 bit)
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG Extended (12 bit)
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG Lossless, first-order prediction
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "-xu",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.5": "-xr",  # RLE Lossless
    "1.2.840.10008.1.2.1.99": "-xd",  # Deflated Explicit VR Little Endian
}

SAMPLES = [
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
    "JPEG-lossy.dcm",  # JPEG extended
    "JPEG-LL.dcm",  # JPEG lossless, process 14 (not bundled with every pydicom)
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless, first-order prediction
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "JPEGLSNearLossless_16.dcm",  # JPEG-LS near-lossless (lacks Study/Series UIDs)
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "JPEG2000.dcm",  # JPEG 2000
    "MR_small_RLE.dcm",  # RLE
    "image_dfl.dcm",  # deflate
]

_LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                    b"UR", b"UT", b"UV"}


# -- preparing samples ------------------------------------------------------------


def dataset_offset(path: Path) -> int:
    """Where the dataset starts: preamble, prefix, the group length element, the group."""
    meta = read_file_meta_info(path)
    return 128 + 4 + 12 + int(meta.FileMetaInformationGroupLength)


def dataset_bytes(path: Path) -> bytes:
    return path.read_bytes()[dataset_offset(path):]


def _fresh_uid(length: int) -> str:
    """A random valid UID of exactly ``length`` characters under the 2.25 root."""
    assert length >= 12, "too short to renumber safely"
    digits = length - len("2.25.")
    return "2.25." + str(secrets.choice("123456789")) + "".join(
        secrets.choice("0123456789") for _ in range(digits - 1))


def _uid_element(group: int, elem: int, uid: str) -> bytes:
    value = uid.encode() + (b"\x00" if len(uid) % 2 else b"")
    return struct.pack("<HH", group, elem) + b"UI" + struct.pack("<H", len(value)) + value


def _insert_before(data: bytes, tag: int, encoded: bytes) -> bytes:
    """Insert elements before the first top-level element with a tag >= ``tag``
    (Explicit VR Little Endian), leaving every other byte as it was."""
    pos = 0
    while pos < len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        if (group << 16 | elem) >= tag:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_LENGTH_VRS:
            length, header = struct.unpack_from("<I", data, pos + 8)[0], 12
        else:
            length, header = struct.unpack_from("<H", data, pos + 6)[0], 8
        if length == 0xFFFFFFFF:
            raise ValueError("undefined length before the insertion point")
        pos += header + length
    return data[:pos] + encoded + data[pos:]


def prepare(name: str, folder: Path) -> Path:
    """A copy of a bundled sample with fresh UIDs, or a skip saying why there is none."""
    source = get_testdata_file(name, download=False)
    if source is None:
        pytest.skip(f"{name} is not bundled with the installed pydicom")
    source = Path(source)
    raw = source.read_bytes()
    offset = dataset_offset(source)
    meta, data = raw[:offset], raw[offset:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(source, stop_before_pixels=True)
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    if syntax not in STORESCU_OPTION:
        pytest.skip(f"{name}: no storescu option proposes {syntax.name}")
    deflated = syntax == DeflatedExplicitVRLittleEndian
    if deflated:
        data = zlib.decompress(data, -zlib.MAX_WBITS)

    # Renumber every UID the node files by; in the file meta too (same lengths, so the
    # meta group length stays right).
    present = [str(ds[k].value) for k in ("StudyInstanceUID", "SeriesInstanceUID",
                                          "SOPInstanceUID") if ds.get(k)]
    for old in sorted(set(present), key=len, reverse=True):
        new = _fresh_uid(len(old)).encode()
        data = data.replace(old.encode(), new)
        meta = meta.replace(old.encode(), new)
    # A sample without Study/Series UIDs would (rightly) be refused: add them.
    missing = [(0x0020000D, "StudyInstanceUID"), (0x0020000E, "SeriesInstanceUID")]
    for tag, keyword in missing:
        if not ds.get(keyword):
            data = _insert_before(data, tag, _uid_element(tag >> 16, tag & 0xFFFF,
                                                          _fresh_uid(40)))
    if deflated:
        compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = compressor.compress(data) + compressor.flush()
        if len(data) % 2:
            data += b"\x00"
    copy = folder / name
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_bytes(meta + data)
    return copy


# -- shared processes -------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node for the whole module: samples carry fresh UIDs, so they never collide."""
    root = tmp_path_factory.mktemp("compressed-node")
    node = NodeProcess(data_dir=root / "var", port=free_port(),
                       db_url=f"sqlite:///{root / 'var' / 'pacsnode.db'}")
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def reference_scp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """DCMTK storescp writing what it receives bit for bit (+B), accepting every syntax."""
    require_tool("storescp")
    out = tmp_path_factory.mktemp("storescp")
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "+B", "+xa", "-aet", "REFERENCE", "-od", str(out), str(port)],
        env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc)
        yield port, out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# -- senders ----------------------------------------------------------------------


def storescu(path: Path, port: int, called: str, syntax: str) -> str:
    result = subprocess.run(
        ["storescu", "-v", "-R", STORESCU_OPTION[syntax], "-aet", "STORESCU", "-aec", called,
         "127.0.0.1", str(port), str(path)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Received Store Response (Success)" in output, output
    return output


def send_raw(path: Path, node: NodeProcess, sop_class: str, syntax: str,
             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="RAWSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(sop_class, [syntax])  # this syntax and nothing else
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established, node.log()
    try:
        status = assoc.send_c_store(path)
    finally:
        assoc.release()
    assert status and status.Status == 0x0000, (status, node.log()[-2000:])


# -- the test ---------------------------------------------------------------------


@pytest.mark.parametrize("sample", SAMPLES)
@pytest.mark.parametrize(
    "sender", ["raw", "storescu", "pacsnode-send"])
def test_compressed_instance_is_stored_byte_exact(
    shared_node: NodeProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest, sample: str, sender: str,
) -> None:
    path = prepare(sample, tmp_path / "sample")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original = dcmread(path)
    syntax = str(original.file_meta.TransferSyntaxUID)
    sop_class = str(original.SOPClassUID)
    expected = dataset_bytes(path)

    if sender == "raw":
        send_raw(path, shared_node, sop_class, syntax, monkeypatch)
    elif sender == "storescu":
        require_tool("storescu")
        ref_port, ref_dir = request.getfixturevalue("reference_scp")
        storescu(path, shared_node.port, shared_node.ae_title, syntax)
        storescu(path, ref_port, "REFERENCE", syntax)
        captured = [p for p in ref_dir.iterdir() if p.name.endswith(str(original.SOPInstanceUID))]
        assert len(captured) == 1, list(ref_dir.iterdir())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert str(read_file_meta_info(captured[0]).TransferSyntaxUID) == syntax, (
                "storescu did not send the file's own transfer syntax")
        expected = dataset_bytes(captured[0])  # what storescu put on the wire
    else:
        result = shared_node.cli("send", str(path), "--port", str(shared_node.port), "--quiet",
                                 check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "1 sent, 0 failed" in result.stdout, result.stdout

    stored = (shared_node.data_dir / "studies" / str(original.StudyInstanceUID)
              / str(original.SeriesInstanceUID) / f"{original.SOPInstanceUID}.dcm")
    assert stored.is_file(), shared_node.log()[-2000:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        copy = dcmread(stored)
    assert str(copy.file_meta.TransferSyntaxUID) == syntax
    assert copy.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert copy.file_meta.MediaStorageSOPClassUID == sop_class
    got = dataset_bytes(stored)
    assert len(got) == len(expected) and got == expected, (
        f"stored dataset differs ({len(got)} bytes, sent {len(expected)})")
    # The compressed pixel data (fragments included) is the sample's own.
    assert copy.PixelData == original.PixelData
