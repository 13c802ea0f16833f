"""Running sums of a training epoch."""


class EpochMeter:
    """Running sums of the losses and accuracy of one epoch."""

    def __init__(self, state=None):
        state = state or {}
        self.sums = dict(state.get("sums", {}))
        self.correct = state.get("correct", 0.0)
        self.count = state.get("count", 0)
        self.steps = state.get("steps", 0)
        # Steps fp16's gradient scaler skipped (an overflow) this epoch.
        self.scaler_skips = state.get("scaler_skips", 0)

    def update(self, losses, correct, count):
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.correct += correct
        self.count += count
        self.steps += 1

    def means(self):
        steps = max(self.steps, 1)
        means = {name: value / steps for name, value in self.sums.items()}
        means["top1"] = 100.0 * self.correct / max(self.count, 1)
        return means

    def state_dict(self):
        return {"sums": dict(self.sums), "correct": self.correct, "count": self.count,
                "steps": self.steps, "scaler_skips": self.scaler_skips}
