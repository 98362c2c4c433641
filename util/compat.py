"""What older versions of this code wrote and a user may still have, read here and nowhere else: results
folders to continue, pre-training checkpoints to resume, online stream states to refuse in one line.
tests/test_compat.py makes each of them as the older version did."""
from util.errors import UserError

# A rerun continues a results folder only if its settings (run_config.json) are the new run's. These flags were
# recorded by older versions (the online ones when the paper's script still took them) or came later, each with
# the value that leaves a run as it was: where a recording holds exactly that value it is left out of the
# comparison on both sides, so such a folder still continues, and a value that changes results still counts.
NEUTRAL_FLAGS = {'encoder_lr_scale': 1., 'clip_grad': 0., 'online_ema': 0., 'online': False, 'online_window': 1,
                 'online_keep_optimizer': False, 'online_reset_every': 0, 'online_anchor': 0., 'online_restore': 0.,
                 'stream_order': None, 'objective': 'mae'}


def settings_as_now(config):
    """A run's recorded settings without the neutral flags above: how two recordings are compared."""
    return {k: v for k, v in config.items() if not (k in NEUTRAL_FLAGS and v == NEUTRAL_FLAGS[k])}


def pretraining_weights(state, model):
    """A pre-training checkpoint's weights for a model without a head. Older versions built pre-training's
    model with a classification head, frozen and never trained, and saved it: its keys are left out, so such a
    checkpoint resumes (the optimiser never held the frozen head)."""
    own = model.state_dict()
    return {k: v for k, v in state.items() if k in own or not k.startswith(model.parts().head)}


def check_stream_state(saved, path):
    """An online stream's saved state. Older versions saved it as a list of tensors in the engine's order,
    which this one cannot put back exactly: refused in one line."""
    if 'state' not in saved:
        raise UserError(f"{path} is an online stream state of an older version of this code, which this one "
                        f"cannot continue exactly; rerun into another --output_dir")
    return saved['state']


def recorded_objective(records, folder):
    """Each image's objective per step in a finished run's records (per_image.npz's 'objective'). Older versions
    recorded the losses only: where the MAE loss was the only one, it was the objective; with others, whose
    weights were not recorded, such a run is refused in one line."""
    if 'objective' in records:
        return records['objective']
    losses = sorted(k for k in records if k.endswith('_loss') and k != 'ce_loss')
    if losses == ['mae_loss']:
        return records['mae_loss']
    raise UserError(f"{folder} records no objective per step (a run of an older version, with the losses "
                    f"{', '.join(losses) or 'none'}): rerun it into a new folder to score stopping rules on it")
