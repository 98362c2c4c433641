"""util/outputs.py: the per-step summary of a run's records."""
import numpy as np

from util.outputs import summarize


def test_summary_per_step():
    records = {'index': np.arange(4), 'label': np.array([0, 1, 1, 0]),
               'pred': np.array([[0, 0, 1], [0, 1, 1], [1, 1, 1], [1, 1, 0]]),
               'ce_loss': np.array([[1., 2., 3.]] * 4), 'mae_loss': np.array([[0.5, 0.25]] * 4),
               'tv_loss': np.array([[2., 1.]] * 4)}  # a second test-time loss, by its name
    summary = summarize(records, 5)
    assert summary['accuracy_per_step'] == [50.0, 75.0, 75.0]
    assert summary['cross_entropy_per_step'] == [1., 2., 3.] and summary['mae_loss_per_step'] == [0.5, 0.25]
    assert summary['tv_loss_per_step'] == [2., 1.] and 'ce_loss_per_step' not in summary
    assert (summary['num_images'], summary['num_images_expected'], summary['complete']) == (4, 5, False)
