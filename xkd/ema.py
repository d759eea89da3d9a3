"""Several EMAs of the student, one per `--model-ema-decay` value, as the OFA-KD / RSD train.py keeps them."""
from timm.utils import ModelEmaV3


class StudentEmas:
    """timm's ModelEmaV3, once per decay; updated together, each evaluated, saved and resumed on its own."""

    def __init__(self, student, decays):
        self.decays = [float(decay) for decay in decays]
        self.emas = [ModelEmaV3(student, decay=decay) for decay in self.decays]

    def update(self, student, step=None):
        for ema in self.emas:
            ema.update(student, step=step)

    def items(self):
        """(name, ema) pairs; the name is the summary.csv prefix: `ema` for one EMA, `ema0.9998` for several."""
        if len(self.emas) == 1:
            return [('ema', self.emas[0])]
        return [(f'ema{decay:g}', ema) for decay, ema in zip(self.decays, self.emas)]

    def state_dicts(self):
        return {f'{decay!r}': ema.module.state_dict() for decay, ema in zip(self.decays, self.emas)}

    def load_state_dicts(self, states, student):
        """Restore each EMA by its decay; one the checkpoint lacks starts from the resumed student's weights.
        Returns the decays that were not in the checkpoint."""
        fresh = []
        for decay, ema in zip(self.decays, self.emas):
            state = states.get(f'{decay!r}')
            if state is None:
                fresh.append(decay)
                state = student.state_dict()
            ema.module.load_state_dict(state)
        return fresh
