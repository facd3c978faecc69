"""The training log: CSV, JSON and curves, and what a resumed run keeps."""

from medssm.engine.history import History


def test_history_csv_json_png_and_resume(tmp_path):
    h = History(tmp_path)
    for e in range(1, 4):
        h.log(epoch=e, train_loss=1 / e, val_dice=0.5 + e / 10, lr=1e-3, nonfinite_steps=0)
    png = h.plot()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "log.csv").read_text().splitlines()[0] == "epoch,train_loss,val_dice,lr,nonfinite_steps"
    resumed = History(tmp_path, resume=True, resume_epoch=2)
    assert [r["epoch"] for r in resumed.rows] == [1, 2]
