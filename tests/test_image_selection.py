"""util/image_selection.py: which images of a folder a run evaluates."""
from util.image_selection import select_indices


def test_select_indices():
    assert select_indices(10).tolist() == list(range(10))
    assert select_indices(10, 4).tolist() == [0, 2, 5, 7]  # evenly spaced over a class-sorted folder
    assert select_indices(10, 3, 'first').tolist() == [0, 1, 2]
    chosen = select_indices(100, 5, 'random', 1)
    assert len(set(chosen.tolist())) == 5 and chosen.tolist() == sorted(chosen.tolist())
    again, other = select_indices(100, 5, 'random', 1), select_indices(100, 5, 'random', 2)
    assert chosen.tolist() == again.tolist() != other.tolist()
    assert select_indices(10, 50).tolist() == list(range(10))
