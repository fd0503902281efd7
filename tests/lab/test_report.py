from omnilm.lab.knowledge.report import pm, table


def test_mean_std_formatting() -> None:
    assert pm([1.0, 3.0]) == "2.000 ± 1.414"
    assert pm([2.0]) == "2.000"
    assert pm([10, None], 0) == "10 ± 0 (1/2 seeds)"
    assert pm([None, None]) == "—"


def test_table() -> None:
    assert table(["a", "b"], [[1, 2]]) == ["| a | b |", "|:---|---:|", "| 1 | 2 |"]
