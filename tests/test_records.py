"""util/records.py: per-image records across processes and kills, and the readers of finished runs."""
import numpy as np
import pytest

from util.errors import UserError
from util.records import ResultStore, is_finished, load_per_image


def add(store, index, steps=1):
    store.add(index=index, label=index % 2, pred=np.full(steps, index % 2), ce_loss=np.full(steps, 0.5),
              mae_loss=np.zeros(steps - 1), seconds=0.)


def test_records_of_several_processes_merge_sorted_and_first_wins(tmp_path):
    a, b = ResultStore(str(tmp_path), rank=0), ResultStore(str(tmp_path), rank=1)
    for i in (4, 0):
        add(a, i, steps=3)
    a.flush()
    add(b, 2, steps=3)
    add(b, 4, steps=3)  # a duplicate of a's (a rerun racing a kill): the first record on disk wins
    b.flush()
    records = ResultStore(str(tmp_path)).load()
    assert records['index'].tolist() == [0, 2, 4] and records['pred'].shape == (3, 3)
    assert ResultStore(str(tmp_path)).done_indices() == {0, 2, 4}


def flushed_store(folder, images=3):
    """A store in folder with the records of `images` images flushed, and those records."""
    store = ResultStore(str(folder))
    for i in range(images):
        add(store, i)
    store.flush()
    return store, store.load()


def test_results_survive_a_kill_between_final_write_and_chunk_removal(tmp_path):
    store, records = flushed_store(tmp_path)
    records['filename'] = np.array(['a', 'b', 'c'])
    chunks = list((tmp_path / 'partial').glob('*.npz'))
    with open(tmp_path / 'per_image.npz', 'wb') as f:  # as finalize() does, but "killed" before removing chunks
        np.savez(f, **records)
    assert chunks and all(c.exists() for c in chunks)
    again = ResultStore(str(tmp_path)).load()
    assert again['index'].tolist() == [0, 1, 2] and again['pred'].ravel().tolist() == [0, 1, 0]
    ResultStore(str(tmp_path)).finalize(again)
    assert not (tmp_path / 'partial').exists() and ResultStore(str(tmp_path)).load()['index'].tolist() == [0, 1, 2]


def test_an_unfinished_runs_per_image_npz_is_marked_and_refused_by_readers(tmp_path):
    store, records = flushed_store(tmp_path)
    with open(tmp_path / 'per_image.npz', 'wb') as f:  # as an unfinished run's flush leaves it
        np.savez(f, **records, filename=np.array(['a', 'b', 'c']), num_images_expected=5)
    add(store, 3)
    store.flush()
    again = ResultStore(str(tmp_path)).load()  # the snapshot and the chunks, without the marker
    assert again['index'].tolist() == [0, 1, 2, 3] and 'num_images_expected' not in again
    assert not is_finished(str(tmp_path))
    with pytest.raises(UserError, match=r'unfinished run.s \(3 of 5 images\)'):
        load_per_image(str(tmp_path))
    (tmp_path / 'partial').rename(tmp_path / 'gone')  # the snapshot alone still holds its images
    assert ResultStore(str(tmp_path)).done_indices() == {0, 1, 2}
    ResultStore(str(tmp_path)).finalize(again)
    assert is_finished(str(tmp_path)) and load_per_image(str(tmp_path))['index'].tolist() == [0, 1, 2, 3]


def test_every_flush_writes_one_chunk_of_what_was_added(tmp_path):
    store, seen = ResultStore(str(tmp_path)), []
    for i in range(3):
        add(store, i)
        store.flush()
        seen.append(len(store.load()['index']))
    store.flush()  # nothing new: no chunk
    assert seen == [1, 2, 3] and store.records_written == 3 and len(list((tmp_path / 'partial').glob('*.npz'))) == 3


def test_unreadable_result_file_is_a_user_error(tmp_path):
    (tmp_path / 'partial').mkdir()
    (tmp_path / 'partial' / 'rank0-1-2-000000.npz').write_bytes(b'not a zip')
    with pytest.raises(UserError, match='cannot read result file'):
        ResultStore(str(tmp_path)).load()
