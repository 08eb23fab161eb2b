"""The checkpoints shipped with forcecalc (installed as ``forcecalc.weights``); see README.md."""
