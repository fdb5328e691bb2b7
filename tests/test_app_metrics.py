"""dnnrl.evaluate's metrics on a hand-made example: the confusion matrix's orientation
(rows = true class, columns = predicted) and per-class accuracy (recall, by row)."""
import numpy as np
import torch

from dnnrl.evaluate import confusion, split_metrics


def test_confusion_rows_are_true_classes():
    true = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 2])
    cm = confusion(pred, true, 4)
    np.testing.assert_array_equal(cm, [[1, 2, 0, 0],
                                       [0, 1, 1, 0],
                                       [0, 0, 1, 0],
                                       [0, 0, 0, 0]])


def test_split_metrics_accuracy_and_per_class_recall():
    true = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 2])
    m = split_metrics(pred, true, ["a", "b", "c", "d"])
    assert m["n"] == 6 and m["accuracy"] == 3 / 6
    # recall per true class; a class absent from the split has no accuracy (not 0)
    assert m["per_class_accuracy"] == {"a": 1 / 3, "b": 1 / 2, "c": 1.0, "d": None}
    assert m["confusion_matrix"][0] == [1, 2, 0, 0]


def test_split_metrics_of_an_empty_split():
    m = split_metrics(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), ["a", "b"])
    assert m["n"] == 0 and m["accuracy"] is None and m["per_class_accuracy"] == {"a": None, "b": None}
