"""RecordIO: fixtures are built byte by byte with struct, never with the project's writer."""
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from torchvision.io import encode_png

from virface.data.recordio import (IRHeader, RecordIOReader, RecordIOSource, RecordIOWriter,
                                   pack, unpack, write_recordio_source)
from virface.data.sources import ArraySource
from virface.errors import CorruptImageError, DataError, RecordIOError

MAGIC_LE = b"\x0a\x23\xd7\xce"  # 0xCED7230A little-endian


def frame(cflag, data):
    """One dmlc frame: magic, lrec = cflag << 29 | length, data, zero padding to 4 bytes."""
    padding = b"\0" * (-len(data) % 4)
    return struct.pack("<II", 0xCED7230A, (cflag << 29) | len(data)) + data + padding


def ir(flag, label, id1=0, id2=0, labels=()):
    return struct.pack("<IfQQ", flag, label, id1, id2) + struct.pack(f"<{len(labels)}f", *labels)


def png(value):
    image = torch.full((3, 2, 3), value, dtype=torch.uint8)
    image[0, 0, 0] = 255 - value  # not flat, so a channel mix-up would show
    return image, encode_png(image).numpy().tobytes()


def write_rec(folder, records, prop="2,2,3"):
    """records: list of (key, framed bytes). Returns the .rec path."""
    rec = os.path.join(folder, "train.rec")
    offset, idx_lines, body = 0, [], b""
    for key, framed in records:
        idx_lines.append(f"{key}\t{offset}\n")
        body += framed
        offset += len(framed)
    with open(rec, "wb") as f:
        f.write(body)
    with open(os.path.join(folder, "train.idx"), "w") as f:
        f.write("".join(idx_lines))
    if prop is not None:
        with open(os.path.join(folder, "property"), "w") as f:
            f.write(prop)
    return rec


@pytest.fixture
def insightface_rec(tmp_path):
    """Key 0 header [4, 6); images 1..3 (labels 5, 7, 7); identity records 4 and 5.

    Record 2 holds the magic word in its id field (payload offset 8): chunks cflag 1 and 3.
    Record 3 holds it in id and id2 (offsets 8 and 16): chunks cflag 1, 2 and 3.
    """
    magic = 0xCED7230A
    img_a, png_a = png(10)
    img_b, png_b = png(20)
    img_c, png_c = png(30)
    p1 = ir(0, 5.0, 1) + png_a
    p2 = ir(0, 7.0, magic) + png_b
    p3 = ir(2, 0.0, magic, magic, labels=(7.0, 3.0)) + png_c
    assert p2[8:12] == MAGIC_LE and p3[8:12] == MAGIC_LE and p3[16:20] == MAGIC_LE
    records = [
        (0, frame(0, ir(2, 0.0, labels=(4.0, 6.0)))),
        (1, frame(0, p1)),
        (2, frame(1, p2[:8]) + frame(3, p2[12:])),
        (3, frame(1, p3[:8]) + frame(2, p3[12:16]) + frame(3, p3[20:])),
        (4, frame(0, ir(2, 0.0, labels=(1.0, 2.0)))),
        (5, frame(0, ir(2, 0.0, labels=(2.0, 4.0)))),
    ]
    rec = write_rec(str(tmp_path), records)
    return {"rec": rec, "payloads": {1: p1, 2: p2, 3: p3}, "images": [img_a, img_b, img_c]}


def test_reader_lists_keys_in_idx_order_and_reassembles_chunked_records(insightface_rec):
    reader = RecordIOReader(insightface_rec["rec"])
    assert reader.keys == [0, 1, 2, 3, 4, 5]
    for key, payload in insightface_rec["payloads"].items():
        assert reader.read(key) == payload


def test_reader_finds_keys_that_are_not_numbered_in_order(tmp_path):
    rec = write_rec(str(tmp_path), [(7, frame(0, b"seven")), (3, frame(0, b"three!!!"))])
    reader = RecordIOReader(rec)
    assert reader.keys == [7, 3]
    assert reader.read(3) == b"three!!!" and reader.read(7) == b"seven"
    with pytest.raises(RecordIOError, match="no record with key 5"):
        reader.read(5)


def test_source_reads_images_and_skips_identity_records(insightface_rec):
    source = RecordIOSource(insightface_rec["rec"])
    assert len(source) == 3
    assert source.classes.tolist() == [5, 7]
    assert source.labels.tolist() == [0, 1, 1]  # record 3's label is the first of (7, 3)
    assert source.num_classes == 2
    assert source.image_size == (2, 3)
    for i, expected in enumerate(insightface_rec["images"]):
        assert torch.equal(source.read(i), expected)
    assert source.describe(1) == f"{insightface_rec['rec']} key 2"


def test_source_uses_every_key_when_record_zero_has_flag_zero(tmp_path):
    img_a, png_a = png(40)
    img_b, png_b = png(50)
    rec = write_rec(str(tmp_path), [(0, frame(0, ir(0, 9.0) + png_a)),
                                    (1, frame(0, ir(0, 2.0) + png_b))], prop=None)
    source = RecordIOSource(rec)
    assert source.labels.tolist() == [1, 0] and source.classes.tolist() == [2, 9]
    assert source.image_size is None
    assert torch.equal(source.read(0), img_a) and torch.equal(source.read(1), img_b)


def test_bad_magic_names_the_file_and_byte_offset(tmp_path):
    rec = write_rec(str(tmp_path), [(0, frame(0, b"abcdefgh"))])
    with open(os.path.join(tmp_path, "train.idx"), "w") as f:
        f.write("0\t4\n")  # points at lrec, not at the magic
    with pytest.raises(RecordIOError, match=r"train\.rec.*byte offset 4.*bad magic"):
        RecordIOReader(rec).read(0)


def test_truncated_record_names_its_byte_offset(tmp_path):
    rec = write_rec(str(tmp_path), [(0, frame(0, b"abcd")), (1, frame(0, b"0123456789ab"))])
    with open(rec, "r+b") as f:
        f.truncate(12 + 8 + 5)  # record 1 starts at 12; keep 5 of its 12 payload bytes
    reader = RecordIOReader(rec)
    assert reader.read(0) == b"abcd"
    with pytest.raises(RecordIOError, match=r"train\.rec: record key 1, byte offset 12: "
                                            r"truncated record.*12 payload bytes.*holds 5"):
        reader.read(1)


def test_offset_beyond_end_of_file_is_named(tmp_path):
    rec = write_rec(str(tmp_path), [(0, frame(0, b"abcd"))])
    with open(os.path.join(tmp_path, "train.idx"), "a") as f:
        f.write("1\t400\n")
    with pytest.raises(RecordIOError, match=r"byte offset 400: offset is beyond the end"):
        RecordIOReader(rec).read(1)


def test_missing_idx_is_a_data_error_naming_it(tmp_path):
    rec = write_rec(str(tmp_path), [(0, frame(0, b"abcd"))])
    os.remove(os.path.join(tmp_path, "train.idx"))
    with pytest.raises(DataError, match=r"train\.idx"):
        RecordIOReader(rec)


def test_malformed_idx_line_names_file_and_line(tmp_path):
    rec = write_rec(str(tmp_path), [(0, frame(0, b"abcd"))])
    with open(os.path.join(tmp_path, "train.idx"), "a") as f:
        f.write("1 x\n")
    with pytest.raises(RecordIOError, match=r"train\.idx:2:.*'1 x'"):
        RecordIOReader(rec)


def test_undecodable_image_names_file_and_key(tmp_path):
    rec = write_rec(str(tmp_path), [(0, frame(0, ir(0, 1.0) + b"not an image"))])
    source = RecordIOSource(rec)
    with pytest.raises(CorruptImageError, match=r"train\.rec key 0"):
        source.read(0)


def test_unpack_splits_header_labels_and_image():
    header, image = unpack(ir(0, 3.0, 11, 12) + b"IMG")
    assert header == IRHeader(0, 3.0, 11, 12) and image == b"IMG"
    header, image = unpack(ir(2, 0.0, 1, 2, labels=(4.0, 6.5)) + b"IMG")
    assert header == IRHeader(2, (4.0, 6.5), 1, 2) and image == b"IMG"


def test_pack_matches_the_mxnet_byte_layout():
    assert pack(IRHeader(0, 3.0, 11, 12), b"IMG") == ir(0, 3.0, 11, 12) + b"IMG"
    # flag comes from the label: a tuple of two floats gives flag 2 and a 0.0 label field
    assert pack(IRHeader(0, (4.0, 6.5), 1, 2), b"") == ir(2, 0.0, 1, 2, labels=(4.0, 6.5))


def test_writer_splits_payload_at_aligned_magic_words_like_dmlc(tmp_path):
    payload = b"abcd" + MAGIC_LE + b"efgh" + MAGIC_LE + b"ij"
    rec = str(tmp_path / "x.rec")
    with RecordIOWriter(rec, str(tmp_path / "x.idx")) as writer:
        writer.write(0, payload)
        writer.write(1, b"a" + MAGIC_LE + b"bcd")  # unaligned: stored whole
    first = frame(1, b"abcd") + frame(2, b"efgh") + frame(3, b"ij")
    expected = first + frame(0, b"a" + MAGIC_LE + b"bcd")
    assert open(rec, "rb").read() == expected
    assert open(tmp_path / "x.idx").read() == f"0\t0\n1\t{len(first)}\n"


def test_writer_round_trip_including_payloads_with_the_magic_word(tmp_path):
    payloads = {
        0: b"",
        1: b"xyz",
        2: MAGIC_LE,
        3: MAGIC_LE + MAGIC_LE + b"tail",
        4: b"head" + MAGIC_LE,
        5: b"12345678" + MAGIC_LE + b"abcd" + MAGIC_LE + b"z",
        6: bytes(range(256)) * 3,
    }
    rec = str(tmp_path / "train.rec")
    with RecordIOWriter(rec, str(tmp_path / "train.idx")) as writer:
        for key, payload in payloads.items():
            writer.write(key, payload)
    reader = RecordIOReader(rec)
    assert reader.keys == list(payloads)
    for key, payload in payloads.items():
        assert reader.read(key) == payload


def test_writer_leaves_nothing_behind_when_an_exception_interrupts_it(tmp_path):
    rec = tmp_path / "train.rec"
    with pytest.raises(KeyError):
        with RecordIOWriter(str(rec), str(tmp_path / "train.idx")) as writer:
            writer.write(0, b"abcd")
            raise KeyError("boom")
    assert os.listdir(tmp_path) == []


def test_write_recordio_source_round_trip_in_insightface_layout(tmp_path):
    images = np.zeros((4, 2, 3, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = [11, 22, 33, 44]
    source = ArraySource(images, [10, 3, 10, 7], name="tiny")
    write_recordio_source(source, str(tmp_path))

    back = RecordIOSource(str(tmp_path / "train.rec"))
    # stable sort by label: image 1 (3), image 3 (7), images 0 and 2 (10)
    assert back.classes.tolist() == [3, 7, 10]
    assert back.labels.tolist() == [0, 1, 2, 2]
    assert [int(back.read(i)[0, 0, 0]) for i in range(4)] == [22, 44, 11, 33]
    assert back.image_size == (2, 3)
    assert open(tmp_path / "property").read().strip() == "3,2,3"

    reader = RecordIOReader(str(tmp_path / "train.rec"))
    assert reader.keys == list(range(8))  # header, 4 images, 3 identities
    assert unpack(reader.read(0))[0].label == (5.0, 8.0)
    assert [unpack(reader.read(k))[0].label for k in (5, 6, 7)] == [(1.0, 2.0), (2.0, 3.0),
                                                                   (3.0, 5.0)]
    assert unpack(reader.read(3))[0] == IRHeader(0, 10.0, 3, 0)


def test_reader_pickles_without_its_file_handle_and_reopens(insightface_rec):
    reader = RecordIOReader(insightface_rec["rec"])
    assert reader.read(1) == insightface_rec["payloads"][1]  # opens the file
    state = reader.__getstate__()
    assert "_fd" not in state and "_lock" not in state
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.read(3) == insightface_rec["payloads"][3]


class _Images(torch.utils.data.Dataset):
    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return self.source.read(i)


def test_source_reads_in_dataloader_worker_processes(insightface_rec):
    source = RecordIOSource(insightface_rec["rec"])
    source.read(0)  # the parent opened the file before the workers start
    loader = torch.utils.data.DataLoader(_Images(source), batch_size=None, num_workers=2)
    got = list(loader)
    for image, expected in zip(got, insightface_rec["images"]):
        assert torch.equal(image, expected)
