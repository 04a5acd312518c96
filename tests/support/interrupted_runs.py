"""Run a training command, interrupt it after an epoch, resume it (a helper, not a test module)."""
import pytest

from and_mask.core.training import Trainer


def interrupt(run, argv, output_dir, monkeypatch, stop_after_epoch):
    """`run(argv + [--output_dir ...])` stopped by Ctrl-C after `stop_after_epoch`'s checkpoint."""
    original = Trainer._checkpoint

    def stop(self, epoch):
        original(self, epoch)
        if epoch == stop_after_epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_checkpoint", stop)
    with pytest.raises(SystemExit, match="^130$"):  # 128 + SIGINT
        run(argv + ["--output_dir", str(output_dir)])
    assert len((output_dir / "metrics.jsonl").read_text().splitlines()) == stop_after_epoch
    monkeypatch.setattr(Trainer, "_checkpoint", original)


def interrupt_then_resume(run, argv, output_dir, monkeypatch, stop_after_epoch):
    """`run(argv + [--output_dir ...])` stopped by Ctrl-C after `stop_after_epoch`'s checkpoint, then --resume."""
    interrupt(run, argv, output_dir, monkeypatch, stop_after_epoch)
    return run(argv + ["--output_dir", str(output_dir), "--resume"])
