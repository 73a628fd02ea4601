"""Input files checked by content; output selection, hashing and local storage."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from PIL import Image

from runflow_worker.errors import ErrorCode, RunFailure
from runflow_worker.run import inputs
from runflow_worker.run.contract import InputDef, InputType
from runflow_worker.run.inputs import check_image, materialise_inputs, safe_filename
from runflow_worker.run.outputs import select_outputs, store_outputs
from runflow_worker.run.storage import LocalStorage, UploadCanceled, open_storage
from runflow_worker.runtime.protocol import OutputFile
from tests.fakes.fetchers import copy_fetch


def image_bytes(fmt: str, size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(("fmt", "ext"), [("PNG", ".png"), ("JPEG", ".jpg"),
                                          ("WEBP", ".webp"), ("GIF", ".gif")])
def test_accepted_image_formats_by_content(tmp_path: Path, fmt: str, ext: str) -> None:
    path = tmp_path / "misnamed.txt"  # the name says nothing
    path.write_bytes(image_bytes(fmt))
    assert check_image(path, max_pixels=10_000, field="input.img") == ext


@pytest.mark.parametrize("payload", [b"%PDF-1.4 not an image", b"", b"\x89PNG\r\n\x1a\n broken"])
def test_non_images_refused(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(payload)
    with pytest.raises(RunFailure) as info:
        check_image(path, max_pixels=10_000, field="input.img")
    assert info.value.code is ErrorCode.INVALID_INPUT
    assert "input.img" in info.value.message


def test_bmp_refused_even_if_pillow_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(image_bytes("BMP"))
    with pytest.raises(RunFailure):
        check_image(path, max_pixels=10_000, field="input.img")


def test_pixel_limit_checked_from_the_header(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(image_bytes("PNG", (300, 200)))
    with pytest.raises(RunFailure) as info:
        check_image(path, max_pixels=300 * 200 - 1, field="input.img")
    assert "pixel limit" in info.value.message


def animated_gif(frames: int, size: tuple[int, int] = (10, 10)) -> bytes:
    buf = io.BytesIO()
    pictures = [Image.new("RGB", size, (i * 40, 0, 0)) for i in range(frames)]
    pictures[0].save(buf, format="GIF", save_all=True, append_images=pictures[1:])
    return buf.getvalue()


@pytest.mark.parametrize("small_limit", [1 << 20, 16], ids=["from-memory", "from-the-file"])
def test_every_frame_counts_whether_read_whole_or_from_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_limit: int) -> None:
    # A small image is parsed from the bytes read whole, a large one from the file: both
    # count the frames of an animation against the limit (3 x 100 pixels here).
    monkeypatch.setattr(inputs, "SMALL_IMAGE_BYTES", small_limit)
    path = tmp_path / "anim.gif"
    path.write_bytes(animated_gif(3))
    assert check_image(path, max_pixels=300, field="input.img") == ".gif"
    with pytest.raises(RunFailure) as info:
        check_image(path, max_pixels=299, field="input.img")
    assert "3 frames" in info.value.message and info.value.details == {"fields": ["input.img"]}


def test_a_missing_file_is_an_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(RunFailure) as info:
        check_image(tmp_path / "gone.png", max_pixels=10_000, field="input.img")
    assert info.value.code is ErrorCode.INVALID_INPUT


def test_decompression_bomb_header(tmp_path: Path) -> None:
    # A PNG header claiming 100000 x 100000 pixels with almost no data.
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + \
        chunk(b"IEND", b"")
    path = tmp_path / "bomb.png"
    path.write_bytes(png)
    with pytest.raises(RunFailure) as info:
        check_image(path, max_pixels=64 * 2**20, field="input.img")
    assert info.value.code is ErrorCode.INVALID_INPUT


def test_materialise_inputs_names_files_itself(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "photo.jpeg").write_bytes(image_bytes("PNG"))  # a PNG named .jpeg
    (src / "notes; rm -rf.txt").write_text("hello")
    defs = {"img": InputDef(input_id="img", type=InputType.IMAGE),
            "doc": InputDef(input_id="doc", type=InputType.FILE),
            "s": InputDef(input_id="s", type=InputType.STRING)}
    values = {"img": (src / "photo.jpeg").as_uri(), "doc": (src / "notes; rm -rf.txt").as_uri(),
              "s": "x"}
    input_dir = tmp_path / "input"
    files = materialise_inputs(defs, values, input_dir, copy_fetch, max_bytes=10**6,
                               max_pixels=10**6, cancel=lambda: False)
    png_digest = hashlib.sha256((src / "photo.jpeg").read_bytes()).hexdigest()[:16]
    doc_digest = hashlib.sha256(b"hello").hexdigest()[:16]
    assert files["img"] == f"runflow_inputs/{png_digest}/img.png"
    assert files["doc"] == f"runflow_inputs/{doc_digest}/notes_rm_-rf.txt"
    assert (input_dir / files["doc"]).read_text() == "hello"
    assert "s" not in files


def test_a_fetchers_digest_names_the_folder_without_a_second_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "photo.png"
    src.write_bytes(image_bytes("PNG"))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    reads: list[Path] = []
    monkeypatch.setattr("runflow_worker.run.inputs.sha256_file",
                        lambda path: reads.append(path) or digest)

    def fetch(url: str, dest: Path, *, max_bytes: int, cancel) -> str | None:
        copy_fetch(url, dest, max_bytes=max_bytes, cancel=cancel)
        return digest if "hashed" in url else None

    defs = {"img": InputDef(input_id="img", type=InputType.IMAGE)}
    values = {"img": src.as_uri() + "?hashed"}
    files = materialise_inputs(defs, values, tmp_path / "in", fetch, max_bytes=10**6,
                               max_pixels=10**6, cancel=lambda: False)
    assert files["img"] == f"runflow_inputs/{digest[:16]}/img.png" and reads == []
    # A fetcher that did not hash what it wrote: the file is hashed after.
    files = materialise_inputs(defs, {"img": src.as_uri()}, tmp_path / "in2", fetch,
                               max_bytes=10**6, max_pixels=10**6, cancel=lambda: False)
    assert files["img"] == f"runflow_inputs/{digest[:16]}/img.png" and len(reads) == 1


def test_an_input_is_fetched_into_a_reserved_file_private_to_the_worker(tmp_path: Path) -> None:
    from runflow_worker.run.dirreserve import DirReserve

    res = DirReserve(tmp_path / "reserve", size=4, file_size=2)
    res.replenish()
    src = tmp_path / "photo.png"
    src.write_bytes(image_bytes("PNG"))
    input_dir = tmp_path / "input"
    input_dir.mkdir()
    files = materialise_inputs({"img": InputDef(input_id="img", type=InputType.IMAGE)},
                               {"img": src.as_uri()}, input_dir, copy_fetch, max_bytes=10**6,
                               max_pixels=10**6, cancel=lambda: False, reserve=res)
    fetched = input_dir / files["img"]
    assert fetched.read_bytes() == src.read_bytes()
    assert fetched.stat().st_mode & 0o777 == 0o600
    assert res.files_taken == 1 and res.taken == 2  # runflow_inputs/ and <content>/


def test_safe_filename() -> None:
    assert safe_filename("https://h/a/b/..%2F..%2Fetc%2Fpasswd", "x") == "etc_passwd"
    assert safe_filename("https://h/", "fallback") == "fallback"
    assert safe_filename("https://h/", "../../x.txt") == "x.txt"
    assert safe_filename("https://h/..", "..") == "input"


def test_input_ids_never_climb_out_nor_share_a_path(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    png_a, png_b = tmp_path / "a.png", tmp_path / "b.png"
    png_a.write_bytes(image_bytes("PNG", (1, 1)))
    Image.new("RGB", (2, 2), (0, 0, 255)).save(png_b)
    (src / "d" / "planted").write_text("caller's bytes")
    absolute = str(tmp_path / "absolute")
    ids = {"../../../../planted.txt": InputType.FILE, "..": InputType.FILE,
           absolute: InputType.FILE, "a b": InputType.IMAGE, "a_b": InputType.IMAGE}
    defs = {i: InputDef(input_id=i, type=t) for i, t in ids.items()}
    # URLs ending in "/" leave no name of their own: the fallback must be harmless too.
    values = {i: (src / "d").as_uri() + "/" for i, t in ids.items() if t is InputType.FILE}
    values |= {"a b": png_a.as_uri(), "a_b": png_b.as_uri()}

    def fetch(url: str, dest: Path, *, max_bytes: int, cancel) -> None:
        path = Path(unquote(urlsplit(url).path))
        shutil.copyfile(path / "planted" if path.is_dir() else path, dest)

    input_dir = tmp_path / "run" / "input"
    files = materialise_inputs(defs, values, input_dir, fetch, max_bytes=10**6,
                               max_pixels=10**6, cancel=lambda: False)
    for rel in files.values():
        assert (input_dir / rel).resolve().is_relative_to(input_dir / "runflow_inputs")
    # The three FILE inputs have the same bytes and no name of their own: one file, the
    # same for each (its folder names its content); the two images differ.
    assert len(set(files.values())) == 3
    assert sorted(p.name for p in tmp_path.rglob("planted*")) == ["planted"]  # the source only
    assert not Path(absolute).exists()
    with Image.open(input_dir / files["a b"]) as one, Image.open(input_dir / files["a_b"]) as two:
        assert one.size == (1, 1) and two.size == (2, 2)
    assert files["a_b"].endswith("/a_b.png")  # plain ids keep readable names
    assert files["a b"].startswith("runflow_inputs/") and files["a b"].endswith(".png")
    assert Path(files["a b"]).name not in ("a b.png", "a_b.png")  # never another id's name


def test_a_file_at_the_inputs_path_is_replaced_not_written_through(tmp_path: Path) -> None:
    # Whatever stands where an input lands (say a hard link to a shared blob) keeps its bytes.
    blob = tmp_path / "blob"
    blob.write_bytes(b"shared model bytes")
    input_dir = tmp_path / "input"
    final = input_dir / "runflow_inputs" / hashlib.sha256(b"EVIL").hexdigest()[:16]
    final.mkdir(parents=True)
    (final / "m.bin").hardlink_to(blob)
    src = tmp_path / "m.bin"
    src.write_bytes(b"EVIL")
    files = materialise_inputs({"doc": InputDef(input_id="doc", type=InputType.FILE)},
                               {"doc": src.as_uri()}, input_dir, copy_fetch, max_bytes=10**6,
                               max_pixels=10**6, cancel=lambda: False)
    assert input_dir / files["doc"] == final / "m.bin"
    assert (input_dir / files["doc"]).read_bytes() == b"EVIL"
    assert blob.read_bytes() == b"shared model bytes"
    assert [p.name for p in (input_dir / "runflow_inputs").rglob("*")] == [
        final.name, "m.bin"]  # no temporary file left


def test_multi_picture_jpeg_is_a_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "phone.jpg"
    first = Image.new("RGB", (8, 6), (1, 2, 3))
    first.save(path, format="MPO", save_all=True,
               append_images=[Image.new("RGB", (8, 6), (4, 5, 6))])
    with Image.open(path) as im:
        assert im.format == "MPO"  # what Pillow calls it
    assert check_image(path, max_pixels=10_000, field="input.img") == ".jpg"


def test_output_selection_rule() -> None:
    runflow = [OutputFile("9", "RunflowOutputImage", "hero_00001_.png", "hero"),
               OutputFile("9", "RunflowOutputImage", "hero_00002_.png", "hero"),
               OutputFile("5", "SaveImage", "ComfyUI_00001_.png", None)]
    assert [(o, f.relpath) for o, f in select_outputs(runflow)] == [
        ("hero", "hero_00001_.png"), ("hero", "hero_00002_.png")]
    fallback = [OutputFile("5", "SaveImage", "a.png", None),
                OutputFile("6", "SaveAnimatedWEBP", "b.webp", None)]
    assert [o for o, _ in select_outputs(fallback)] == ["5", "6"]


def test_store_outputs_local(tmp_path: Path) -> None:
    out_dir = tmp_path / "output"
    (out_dir / "sub").mkdir(parents=True)
    (out_dir / "hero_00001_.png").write_bytes(image_bytes("PNG"))
    (out_dir / "sub" / "hero_00001_.png").write_bytes(b"other")
    storage = open_storage((tmp_path / "store").as_uri())
    assert isinstance(storage, LocalStorage)
    entries = store_outputs([OutputFile("9", "RunflowOutputImage", "hero_00001_.png", "hero"),
                             OutputFile("9", "RunflowOutputImage", "sub/hero_00001_.png",
                                        "hero")], out_dir, "run-9", storage)
    assert [e.key for e in entries] == ["runs/run-9/hero/hero_00001_.png",
                                        "runs/run-9/hero/hero_00001__2.png"]
    first = entries[0]
    assert first.content_type == "image/png"
    stored = Path(unquote(urlsplit(first.url).path))
    assert stored.read_bytes() == (out_dir / "hero_00001_.png").read_bytes()
    assert first.sha256 == hashlib.sha256(stored.read_bytes()).hexdigest()
    assert first.size_bytes == stored.stat().st_size


def test_a_stored_output_is_a_copy_the_child_cannot_change_later(tmp_path: Path) -> None:
    # The warm child may keep an output open and write to it after the run: the stored
    # object must keep the bytes its digest was taken of (never a hard link to the output).
    out_dir = tmp_path / "output"
    out_dir.mkdir()
    (out_dir / "a.png").write_bytes(image_bytes("PNG"))
    storage = LocalStorage(tmp_path / "store")
    (entry,) = store_outputs([OutputFile("9", "RunflowOutputImage", "a.png", "hero")],
                             out_dir, "run-1", storage, should_stop=lambda: False)
    stored = Path(unquote(urlsplit(entry.url).path))
    assert entry.url == storage._path(entry.key).as_uri()  # the URL as resolved anew
    with (out_dir / "a.png").open("r+b") as fh:  # the same inode, changed in place
        fh.write(b"changed later")
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == entry.sha256
    assert os.stat(stored).st_ino != os.stat(out_dir / "a.png").st_ino
    # The same for a put of a plain path on the same file system.
    storage.put(out_dir / "a.png", "runs/run-1/hero/b.png", content_type="image/png",
                sha256="0")
    assert os.stat(tmp_path / "store/runs/run-1/hero/b.png").st_nlink == 1


def test_store_outputs_refuses_escaping_paths(tmp_path: Path) -> None:
    out_dir = tmp_path / "output"
    out_dir.mkdir()
    (tmp_path / "secret").write_text("s")
    with pytest.raises(RunFailure) as info:
        store_outputs([OutputFile("3", "X", "../secret", None)], out_dir, "r",
                      LocalStorage(tmp_path / "store"))
    assert info.value.code is ErrorCode.NODE_ERROR


@pytest.mark.timeout(30)
def test_a_huge_sparse_output_is_abandoned_once_the_run_must_stop(tmp_path: Path) -> None:
    """A node can announce a sparse file of terabytes (no disk used): hashing it would
    take days, so the hash stops with the run (its timeout, a cancel) like the transfer."""
    out = tmp_path / "output"
    out.mkdir()
    with (out / "huge.bin").open("wb") as fh:
        fh.truncate(2**43)
    polls = []

    def should_stop() -> bool:
        polls.append(1)
        return len(polls) > 3  # the run's timeout comes while the file is hashed

    with pytest.raises(UploadCanceled):
        store_outputs([OutputFile("1", "Save", "huge.bin", "blob")], out, "run-1",
                      LocalStorage(tmp_path / "store"), should_stop=should_stop)
    assert not any((tmp_path / "store").rglob("huge.bin"))


def test_content_types_of_output_files() -> None:
    """ComfyUI's usual outputs by their own table, in any case; the rest as ``mimetypes``
    reads them, else ``application/octet-stream``."""
    from runflow_worker.run.outputs import content_type_of

    assert content_type_of("ComfyUI_00001_.PNG") == "image/png"
    assert content_type_of("a.jpeg") == content_type_of("b.jpg") == "image/jpeg"
    assert content_type_of("clip.webm") == "video/webm"
    assert content_type_of("notes.txt") == "text/plain"
    assert content_type_of("weights.safetensors") == "application/octet-stream"
    assert content_type_of("no-suffix") == "application/octet-stream"
