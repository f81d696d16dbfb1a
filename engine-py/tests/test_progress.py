"""The progress bar: one tick per finished prompt, as vLLM's "Processed prompts"."""

import io

from llmd import SamplingParams


class Recorder:
    """A stand-in for tqdm (vLLM accepts a tqdm-like callable as use_tqdm)."""

    made = []

    def __init__(self, total, desc, dynamic_ncols):
        self.total, self.desc, self.n, self.closed = total, desc, 0, False
        Recorder.made.append(self)

    def update(self, k):
        self.n += k

    def close(self):
        self.closed = True


def test_progress_counts_prompts(stories):
    Recorder.made.clear()
    stories.generate(["Once"] * 10, SamplingParams(n=2, max_tokens=4), use_tqdm=Recorder)
    (bar,) = Recorder.made
    assert (bar.total, bar.n, bar.closed, bar.desc) == (10, 10, True, "Processed prompts")


def test_tqdm_bar_when_installed(stories, monkeypatch):
    import pytest

    tqdm = pytest.importorskip("tqdm")
    buf = io.StringIO()
    monkeypatch.setattr("sys.stderr", buf)
    stories.generate(["Once"] * 8, SamplingParams(max_tokens=4), use_tqdm=True)
    assert "Processed prompts" in buf.getvalue() and "8/8" in buf.getvalue()
    del tqdm


def test_no_bar_when_off(stories, capsys):
    stories.generate(["Once"] * 3, SamplingParams(max_tokens=4), use_tqdm=False)
    assert "Processed" not in capsys.readouterr().err
