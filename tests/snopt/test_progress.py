"""Plain progress lines (output that is not a terminal): when they are written and what they say."""

import io

from snopt._progress import PlainProgress, progress_bar


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_lines_come_at_the_interval_and_one_last_line_at_close():
    stream = io.StringIO()
    bar = PlainProgress(4, desc="train", unit="step", stream=stream, interval=3600)
    for _ in range(3):
        bar.update()
    assert _lines(stream) == []  # the interval has not passed
    bar.set_postfix({"loss": 0.5})
    bar.close()
    bar.close()
    (line,) = _lines(stream)
    assert line.startswith("train 3/4 step (75%) loss=0.5, ") and line.endswith(" s")


def test_close_does_not_repeat_the_line_just_written():
    stream = io.StringIO()
    bar = PlainProgress(2, desc="study", unit="trial", stream=stream, interval=0)
    bar.update()
    bar.update()
    bar.close()
    counts = [line.split(",")[0] for line in _lines(stream)]
    assert counts == ["study 1/2 trial (50%)", "study 2/2 trial (100%)"]


def test_close_writes_what_changed_since_the_last_line():
    stream = io.StringIO()
    bar = PlainProgress(None, initial=5, desc="train", unit="NFE", stream=stream, interval=0)
    bar.update(2)
    bar.interval = 3600
    bar.set_postfix({"T": 1.2})
    bar.close()
    assert [line.split(",")[0] for line in _lines(stream)] == ["train 7 NFE", "train 7 NFE T=1.2"]


def test_a_stream_that_is_not_a_terminal_gets_plain_lines(capsys):
    bar = progress_bar(3, desc="train", unit="step")
    assert isinstance(bar, PlainProgress)
    assert progress_bar(3, desc="train", unit="step", enabled=False) is None
    bar.close()
    assert capsys.readouterr().err.startswith("train 0/3 step (0%), ")
