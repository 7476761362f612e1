"""Captions that are not UTF-8: a DataError naming the file and the byte, never a bare UnicodeDecodeError
and never a caption trained on with U+FFFD in it; the byte-order marks spreadsheets write are accepted."""

from __future__ import annotations

import json

import pytest
from helpers import write_folder

from sdsweep.data.folder import DataError, scan_folder
from sdsweep.sweep.trial import run_trial

ICONV = "re-save it as UTF-8, e.g. for Latin-1 / Windows-1252 text `iconv -f latin1 -t utf-8 {path} > {name}.utf8` " \
        "and move that over the original"


def _not_utf8(path, byte: int, offset: int, line: int) -> str:
    return (f"{path} is not UTF-8 (byte 0x{byte:02x} at offset {offset}, line {line}): "
            + ICONV.format(path=path, name=path.name))


def test_a_latin1_metadata_jsonl_names_the_file_the_byte_and_the_fix(tmp_path):
    folder = write_folder(tmp_path, n=2, captions="none")
    lines = [json.dumps({"file_name": "img0.png", "text": "a dog"}),
             json.dumps({"file_name": "img1.png", "text": "un café"}, ensure_ascii=False)]
    data = "\n".join(lines).encode("latin-1")
    (folder / "metadata.jsonl").write_bytes(data)
    offset = data.index(b"\xe9")
    assert offset == len(lines[0]) + 1 + len('{"file_name": "img1.png", "text": "un caf')
    with pytest.raises(DataError) as error:
        scan_folder(folder)
    assert str(error.value) == _not_utf8(folder / "metadata.jsonl", 0xE9, offset, line=2)


def test_a_utf16_metadata_csv_with_its_bom_is_read_exactly(tmp_path):
    folder = write_folder(tmp_path, n=2, captions="none")
    text = 'file_name,text\r\nimg0.png,"un café, assis"\r\nimg1.png,ein Hund – groß\r\n'
    (folder / "metadata.csv").write_bytes(text.encode("utf-16"))  # Python writes the BOM, as Excel does
    assert (folder / "metadata.csv").read_bytes()[:2] in (b"\xff\xfe", b"\xfe\xff")
    assert [r.caption for r in scan_folder(folder).records] == ["un café, assis", "ein Hund – groß"]
    (folder / "metadata.csv").write_bytes(text.encode("utf-16-be"))  # UTF-16 without a BOM: NULs in "UTF-8"
    path = folder / "metadata.csv"
    with pytest.raises(DataError) as error:
        scan_folder(folder)
    assert str(error.value) == (f"{path} holds NUL bytes: it is probably UTF-16 without a byte-order mark; "
                                f"re-save it as UTF-8, e.g. `iconv -f utf-16be -t utf-8 {path} > metadata.csv.utf8`")
    (folder / "metadata.csv").write_bytes(text.encode("utf-32"))  # starts with FF FE, as UTF-16 LE does
    with pytest.raises(DataError) as error:
        scan_folder(folder)
    assert str(error.value) == f"{path} is not UTF-8 or UTF-16 (UTF-32?): re-save it as UTF-8"


def test_latin1_txt_captions_are_an_error_naming_every_file(tmp_path):
    folder = write_folder(tmp_path, n=4, captions="txt")
    (folder / "img1.txt").write_bytes("une tête".encode("latin-1"))
    (folder / "img3.txt").write_bytes("déjà vu".encode("cp1252"))
    with pytest.raises(DataError) as error:
        scan_folder(folder)
    assert str(error.value) == _not_utf8(folder / "img1.txt", 0xEA, 5, line=1) + " (so are 1 more: img3.txt)"


def test_a_utf8_bom_is_accepted_in_csv_jsonl_and_txt_and_the_captions_are_exact(tmp_path):
    csv = write_folder(tmp_path / "csv", n=2, captions="none")
    (csv / "metadata.csv").write_text("file_name,text\nimg0.png,\"un café, assis\"\nimg1.png,naïve\n",
                                      encoding="utf-8-sig")  # Excel's "CSV UTF-8"
    assert [r.caption for r in scan_folder(csv).records] == ["un café, assis", "naïve"]
    jsonl = write_folder(tmp_path / "jsonl", n=1, captions="none")
    (jsonl / "metadata.jsonl").write_text(json.dumps({"file_name": "img0.png", "text": "crème brûlée"},
                                                     ensure_ascii=False) + "\n", encoding="utf-8-sig")
    assert [r.caption for r in scan_folder(jsonl).records] == ["crème brûlée"]
    txt = write_folder(tmp_path / "txt", n=1, captions="none")
    (txt / "img0.txt").write_text("Notepad’s caption", encoding="utf-8-sig")
    assert [r.caption for r in scan_folder(txt).records] == ["Notepad’s caption"]  # no U+FEFF in front


def test_a_caption_line_separator_inside_jsonl_stays_in_the_caption(tmp_path):
    """Only \\n (and \\r) end a JSON line: a raw U+2028 in a caption is the caption's, as a text-mode read kept it."""
    folder = write_folder(tmp_path, n=2, captions="none")
    rows = [{"file_name": "img0.png", "text": "left\u2028right"}, {"file_name": "img1.png", "text": "two"}]
    (folder / "metadata.jsonl").write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows),
                                           encoding="utf-8")
    assert [r.caption for r in scan_folder(folder).records] == ["left right", "two"]  # whitespace collapsed


def test_a_trial_on_latin1_captions_fails_with_the_data_error(make_cfg, tmp_path):
    folder = write_folder(tmp_path / "data", n=2, captions="txt")
    (folder / "img0.txt").write_bytes("une tête".encode("latin-1"))
    metrics = run_trial(make_cfg(f"data.path={folder}", steps=1), tmp_path / "trial")
    assert metrics["status"] == "failed"
    assert metrics["reason"] == "DataError: " + _not_utf8(folder / "img0.txt", 0xEA, 5, line=1)
