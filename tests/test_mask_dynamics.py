"""experiments/mask_dynamics.py reads runs with and without the static overlap (logged only with
--static-overlap since the calibration pass became optional).

Run: .venv/bin/python -m pytest -q tests/test_mask_dynamics.py
"""

from experiments import mask_dynamics


def test_the_table_shows_a_dash_where_a_run_has_no_static_overlap(tmp_path):
    plain = [{"step": s, "mask_jaccard_prev": 0.9, "mask_jaccard_step0": 0.8} for s in range(3)]
    static = [r | {"mask_jaccard_step0_static": 0.5} for r in plain]
    text = mask_dynamics.table({"plain": plain, "static": static})
    assert "| plain | 3 | 0.900 | 0.800 | - |" in text
    assert "| static | 3 | 0.900 | 0.800 | 0.500 |" in text
    mask_dynamics.plot({"plain": plain, "static": static}, tmp_path / "m.png", 0.3)
    assert (tmp_path / "m.png").stat().st_size > 0
