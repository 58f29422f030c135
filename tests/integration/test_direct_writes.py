"""The page-cache bypass writes exactly the bytes it is given, aligned or not, in any pieces."""
import os
import random

import numpy as np
import pytest

from savegame.storage import CheckpointStore
from savegame.storage.direct import BOUNCE_BYTES, DirectWrites

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("seed", range(4))
def test_every_byte_arrives_in_order(tmp_path, seed):
    rng = random.Random(seed)
    data = np.frombuffer(os.urandom(3 * BOUNCE_BYTES + 12345), dtype=np.uint8)
    store = CheckpointStore(str(tmp_path))
    staged = store.begin(1)
    with staged.open("blob") as f, DirectWrites(f) as direct:
        position = 0
        while position < data.nbytes:  # pieces of every size, most of them unaligned
            n = rng.choice([1, 7, 4096, 1 << 20, 2 << 20, BOUNCE_BYTES + 3])
            direct.write(memoryview(data[position:position + n]))
            position += n
    info = staged.commit()
    assert (tmp_path / info.name / "blob").read_bytes() == data.tobytes()
    assert store.verify(info) == []


def test_leaving_with_an_error_does_not_flush(tmp_path):
    store = CheckpointStore(str(tmp_path))
    staged = store.begin(1)
    with pytest.raises(RuntimeError), staged:
        with staged.open("blob") as f, DirectWrites(f) as direct:
            direct.write(b"x" * 100)
            raise RuntimeError("the capture failed")
    assert store.list() == [] and store.scan().incomplete == []
