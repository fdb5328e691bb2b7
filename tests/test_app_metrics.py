"""dnnrl.evaluate's metrics on a hand-made example: the confusion matrix's orientation
(rows = true class, columns = predicted) and per-class accuracy (recall, by row); and
which classifier evaluate_model scores each method by."""
import numpy as np
import pytest
import torch

from dnnrl.evaluate import confusion, evaluate_model, split_metrics
from dnnrl.model import DNNRLNet
from dnnrl.runtime import embed
from dnnrl.synthetic import make_synthetic
from dnnrl.transforms import AugmentConfig
from dnnrl_ext import KNNClassifier


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


@pytest.mark.parametrize("method", ["dnn", "dnnrl"])
def test_evaluate_model_scores_dnn_by_its_head_and_the_others_by_knn(tmp_path, method):
    """SPEC section 6: DNN is scored by its softmax head, DNNRL / T-DNN by the k-NN vote
    on the embeddings (k chosen on validation). An untrained network, whose head and
    k-NN vote disagree on some faces, so the two scorings can be told apart."""
    ds = make_synthetic(train_per_class=12, val_per_class=8, test_per_class=8, seed=3)
    torch.manual_seed(0)
    model = DNNRLNet(num_classes=len(ds.class_names), width=0.125).eval()
    aug = AugmentConfig(out_size=48)
    data = {s: (torch.from_numpy(x), torch.from_numpy(y).long()) for s, (x, y) in ds.splits.items()}
    res = evaluate_model(model, data, ds.class_names, aug, torch.device("cpu"), method, "reference",
                         str(tmp_path), k_max=10)
    emb = {s: embed(model, x, aug, torch.device("cpu")) for s, (x, _) in data.items()}
    clf = KNNClassifier(num_classes=len(ds.class_names), backend="reference")
    clf.fit(emb["train"], data["train"][1], val=(emb["val"], data["val"][1]), k_max=10)
    for s in ("val", "test"):
        y = data[s][1]
        head = (embed(model, data[s][0], aug, torch.device("cpu"), head=True).argmax(1) == y).float().mean().item()
        knn = (clf.predict(emb[s]) == y).float().mean().item()
        assert head != knn, "the two scorings agree here, so the test could not tell them apart"
        assert res["%s_accuracy" % s] == pytest.approx(head if method == "dnn" else knn)
    assert res["k"] == (None if method == "dnn" else clf.k)
