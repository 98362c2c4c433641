"""scripts/pick_examples.py: a figure's images by a rule, the first turned right and the first turned wrong."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts'))
from pick_examples import pick  # noqa: E402

from util.errors import UserError  # noqa: E402


def records(index, label, pred):
    return {'index': np.array(index), 'label': np.array(label), 'pred': np.array(pred)}


def test_the_first_in_file_order_of_each_kind():
    # rows out of file order, as a run of several processes stores them; pick gives rows
    r = records([3, 0, 2, 1], [1, 1, 0, 0], [[0, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 1]])
    assert pick(r, 2) == [('turned right', 2), ('turned wrong', 1)]  # files 2 and 0, not 3 and 1
    assert pick(r, 1) == [('turned right', 2)]  # none turned wrong at step 1
    assert pick(records([0, 1], [0, 0], [[0, 0], [0, 0]]), None) == [('the first image', 0)]
    with pytest.raises(UserError, match='steps 1..2'):
        pick(r, 3)
