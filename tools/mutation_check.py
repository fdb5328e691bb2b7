"""Mutation check of the op tests: do they fail when a kernel rule is broken?

Each mutant below changes one rule of SPEC sections 2-3 in the CPU kernels or in the
reference (a tie rule, a strict comparison, a clamp, a normaliser), or of the training
protocol of section 6 (the 10 % rule, the reload, the lr floor, the patience), or of the
application (the schedules and the time budget, the scoring of each method, the packaged
model's PCA gallery and vote shares, face crops, the shipping gate of the GPU session's
ingest, DistributedLoss's gradients, the refusal of pre-Ampere cards, a resumed run's
RNG streams and options, the k-NN monitor, bf16 autocast, video frame sampling, the
transforms' geometry, P x K batches, distributed shards), or of the library's Python and
C++ layer around the kernels (the drop-in loss modules' arguments and defaults, the
wrappers' argument checks and fake shapes, KNNClassifier, the C++ autograd), or of the
built-in synthetic data, or of `dnnrl eval` / `dnnrl embed`, `dnnrl predict` and
DistributedLoss, or of the CUDA kernels (tested in the CPU emulator, tools/cuda_emu). For each, this script applies it in a scratch git worktree of HEAD
(committed work only; it sees ``../shared`` through a link, so the tests that read
FER-2013 faces run there too), builds the extension there (CPU kernels only, about a
minute on two cores; first the unmutated tree, which must pass), runs the op tests (or
the mutant's own tests) with ``-x`` and restores the file. A mutant the tests let pass
is a rule no test pins down; the summary lists those. Mutants marked ``equivalent``
cannot change any result (the reason is written beside them) and are listed for
completeness, not run.

Why a hand-made table and not a mutation-testing package: the mutants worth running
are the semantic rules of one C++ file and its reference, and a generic tool (mutmut,
cosmic-ray) mutates Python only and has no notion of "rebuild the extension first".

Only deterministic tests count: the property tests (hypothesis, whose examples change
from run to run) are left out with ``-m "not hypothesis"``, so that a kill is the same in
every run. A full run on 2026-11-29 showed why: one mutant that a random grid case had
caught the session before survived, because no drawn case held the tie it breaks.
``--property-tests`` lets them count too.

usage: python3 tools/mutation_check.py [--only ID ...] [--keep] [--property-tests]
Prints one line per mutant (killed / SURVIVED, the first failing test, seconds) and
exits 1 if any non-equivalent mutant survived. The baseline runs the op tests; a
protocol mutant runs the protocol tests of tests/test_app_train.py instead.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TESTS = ["tests/test_ops_cases.py", "tests/test_ops_triplet.py", "tests/test_ops_autograd.py",
         "tests/test_knn_ops.py", "tests/test_knn_classifier.py", "tests/test_cpu_gemm_paths.py",
         "tests/test_bad_input.py", "tests/test_loss_modules.py"]

# the training protocol's tests (SPEC section 6), for the mutants of python/dnnrl/train.py
PROTOCOL_TESTS = ["tests/test_app_train.py", "-k", "protocol or cosine or budget"]

SELECT_TESTS = ["tests/test_app_train.py", "-k", "select_by"]
INGEST_TESTS = ["tests/test_benchmark_tools.py", "-k", "ingest"]
DISTRIBUTED_TESTS = ["tests/test_distributed_loss.py"]
BUNDLE_TESTS = ["tests/test_app_eval_bundle.py", "tests/test_app_predict.py", "tests/test_app_packaged_model.py"]
RESUME_TESTS = ["tests/test_app_train.py", "-k", "resume"]
AMP_TESTS = ["tests/test_app_runtime.py", "-k", "amp"]
REPRODUCE_TESTS = ["tests/test_app_reproduce.py"]
SYNTHETIC_TESTS = ["tests/test_app_synthetic.py"]
PREDICT_TESTS = ["tests/test_app_predict.py"]
CONFIG_TESTS = ["tests/test_app_bad_options.py", "tests/test_app_graphs.py"]
EXPORT_TESTS = ["tests/test_app_eval_bundle.py", "tests/test_app_predict.py", "tests/test_app_bad_options.py"]
TRANSFORM_TESTS = ["tests/test_app_transforms.py", "tests/test_app_train.py", "-k",
                   "transform or theta or flip or erase or shift or tta or eval or augment or scaled or crop"]
# the CUDA kernels, run by the CPU emulator (tools/cuda_emu): its own tests and the emulator cases of
# the two CUDA path files (-k emu selects both: the file name test_cuda_emulated.py holds "emu")
EMU_TESTS = ["tests/test_cuda_emulated.py", "tests/test_cuda_loss_paths.py", "tests/test_knn_cuda_paths.py",
             "-k", "emu"]
RUNTIME_TESTS = ["tests/test_app_runtime.py", "tests/test_app_bad_options.py", "tests/test_app_data.py",
                 "tests/test_app_distributed.py"]
CLI_TESTS = ["tests/test_app_train.py", "tests/test_app_bad_options.py", "tests/test_app_eval_bundle.py", "-k",
             "cli or eval"]

# (id, file, text, replacement, why it is equivalent or None[, tests to run instead of TESTS])
MUTANTS = [
    ("exp_grad_at_kink", "csrc/common.h", "return r > gamma ? -alpha * exp", "return r >= gamma ? -alpha * exp", None),
    ("hinge_grad_at_kink", "csrc/common.h", "return (margin - r) > acc_t(0) ? acc_t(-1)",
     "return (margin - r) >= acc_t(0) ? acc_t(-1)", None),
    ("positive_tie_to_larger_index", "csrc/common.h", "return d > best || (d == best && j < best_j);",
     "return d > best || (d == best && j > best_j);", None),
    ("nan_loses_the_min", "csrc/common.h", "  if (dn || bn) return dn && (!bn || j < best_j);\n  return d < best",
     "  if (dn || bn) return bn;\n  return d < best", None),
    ("semi_hard_threshold_without_gamma", "csrc/cpu/triplet_loss_cpu.cpp", "pos_v[i] + gamma : kInf",
     "pos_v[i] : kInf", None),
    ("semi_hard_not_strict", "csrc/cpu/triplet_loss_cpu.cpp", "nc = (!same && v > s.ti) ? v : inf;",
     "nc = (!same && v >= s.ti) ? v : inf;", None),
    ("semi_hard_not_strict_exact_path", "csrc/cpu/triplet_loss_cpu.cpp", "const bool beyond = d[j] > t ||",
     "const bool beyond = d[j] >= t ||", None),
    # easy_positive: the nearest positive, kept as the largest -d (scalar, AVX2, exact path, reference)
    ("op_easy_positive_takes_the_farthest", "csrc/cpu/triplet_loss_cpu.cpp",
     "const acc_t psign = mining == kEasyPositive ? acc_t(-1) : acc_t(1);",
     "const acc_t psign = acc_t(1);", None),
    ("easy_positive_sign_lost_in_scalar_sweep", "csrc/cpu/triplet_loss_cpu.cpp",
     "const acc_t pc = (same && c != s.self) ? s.psign * v : -inf;",
     "const acc_t pc = (same && c != s.self) ? v : -inf;", None),
    ("avx2_easy_positive_sign_lost", "csrc/cpu/triplet_loss_cpu.cpp",
     "_mm256_blendv_ps(ninf, _mm256_mul_ps(psign, v), _mm256_andnot_ps(is_self, same));",
     "_mm256_blendv_ps(ninf, v, _mm256_andnot_ps(is_self, same));", None),
    ("easy_positive_farthest_on_exact_path", "csrc/cpu/triplet_loss_cpu.cpp",
     "const bool take = mining == kEasyPositive ? better_min(d[j], j, pv, pj) : better_max(d[j], j, pv, pj);",
     "const bool take = better_max(d[j], j, pv, pj);", None),
    ("reference_easy_positive_takes_the_farthest", "dnnrl_ext/reference.py",
     "has_pos, pos = _pick(d, same & ~eye, largest=mining != EASY_POSITIVE)",
     "has_pos, pos = _pick(d, same & ~eye, largest=True)", None),
    # the AVX2 forms of the same rules (float32 rows on an AVX2 CPU take them)
    ("avx2_semi_hard_not_strict", "csrc/cpu/triplet_loss_cpu.cpp",
     "_mm256_andnot_ps(same, _mm256_cmp_ps(v, ti, _CMP_GT_OQ))",
     "_mm256_andnot_ps(same, _mm256_cmp_ps(v, ti, _CMP_GE_OQ))",
     None),
    ("avx2_positive_tie_to_later_index", "csrc/cpu/triplet_loss_cpu.cpp",
     "const __m256 up = _mm256_cmp_ps(pc, bp[h], _CMP_GT_OQ);",
     "const __m256 up = _mm256_cmp_ps(pc, bp[h], _CMP_GE_OQ);",
     None),
    ("avx2_negative_tie_to_later_index", "csrc/cpu/triplet_loss_cpu.cpp",
     "const __m256 un = _mm256_cmp_ps(nc, bn[h], _CMP_LT_OQ);",
     "const __m256 un = _mm256_cmp_ps(nc, bn[h], _CMP_LE_OQ);",
     None),
    ("avx2_knn_equal_distance_enters", "csrc/cpu/knn_cpu.cpp",
     "      if (t[b] < worst) {", "      if (t[b] <= worst) {",
     None),
    # the CUDA kernels' own forms of the rules, killed (or not) in the CPU emulator
    ("cuda_knn_tie_to_larger_index", "csrc/cuda/utils.cuh", "return d1 < d2 || (d1 == d2 && j1 < j2);",
     "return d1 < d2 || (d1 == d2 && j1 > j2);", None, EMU_TESTS),
    ("cuda_knn_nan_first", "csrc/cuda/utils.cuh", "if (n1 || n2) return n2 && (!n1 || j1 < j2);",
     "if (n1 || n2) return n1 && (!n2 || j1 < j2);", None, EMU_TESTS),
    ("cuda_knn_non_finite_norm_kept", "csrc/cuda/tile.cuh", "if (kNonFiniteAsNaN && !isfinite(s))",
     "if (false && !isfinite(s))", None, EMU_TESTS),
    ("cuda_vote_tie_to_later_class", "csrc/cuda/knn_cuda.cu", "    if (total > best_v) {\n      best_v = total;",
     "    if (total >= best_v) {\n      best_v = total;", None, EMU_TESTS),
    ("cuda_semi_hard_threshold_without_gamma", "csrc/cuda/triplet_loss_cuda.cu", "thr[row] = m.pd + gamma;",
     "thr[row] = m.pd;", None, EMU_TESTS),
    ("cuda_easy_positive_takes_the_farthest", "csrc/cuda/triplet_loss_cuda.cu", "const acc_t dp = kEasy ? -d : d;",
     "const acc_t dp = d;", None, EMU_TESTS),
    # (halving the slack, 0.5f * e, survived in session 25: the largest error of a float16 distance
    # is about 0.8 e, so a test would need rounding errors aligned on purpose; none yet)
    ("cuda_filter_without_slack", "csrc/cuda/knn_cuda.cu", "  return 2.f * e + ldexpf(rn + gmax, -20);",
     "  return 0.f * e;", None, EMU_TESTS),
    # the CPU tiles' GEMM: oneDNN on non-Intel CPUs by default, DNNRL_CPU_TILE_GEMM overriding it
    ("tile_gemm_vendor_rule_inverted", "csrc/cpu/tile_product.h",
     "(setting == TileGemm::kAuto && !cpu_is_intel())", "(setting == TileGemm::kAuto && cpu_is_intel())",
     None, ["tests/test_cpu_gemm_paths.py"]),
    ("tile_gemm_onednn_setting_ignored", "csrc/cpu/tile_product.h",
     "return setting == TileGemm::kOnednn || (", "return (", None, ["tests/test_cpu_gemm_paths.py"]),
    ("mean_over_all_anchors", "csrc/cpu/triplet_loss_cpu.cpp",
     "if (reduction == kMean) total /= double(std::max<int64_t>(count, 1));",
     "if (reduction == kMean) total /= double(std::max<int64_t>(int64_t(per.size()), 1));", None),
    ("backward_mean_over_all_anchors", "csrc/cpu/triplet_loss_cpu.cpp",
     "acc_t(1) / acc_t(std::max<int64_t>(count, 1)) : acc_t(1);",
     "acc_t(1) / acc_t(std::max<int64_t>(T, 1)) : acc_t(1);", None),
    ("knn_tie_to_larger_index", "csrc/cpu/knn_cpu.cpp", "  return j < bj;\n}", "  return j > bj;\n}", None),
    ("knn_no_clamp_at_zero", "csrc/cpu/knn_cpu.cpp", "return d < acc_t(0) ? acc_t(0) : d;", "return d;", None),
    ("knn_nan_ranks_first", "csrc/cpu/knn_cpu.cpp", "if (dn != bn) return bn;", "if (dn != bn) return dn;", None),
    ("knn_non_finite_norm_kept", "csrc/cpu/knn_cpu.cpp",
     "return std::isfinite(n) ? n : std::numeric_limits<acc_t>::quiet_NaN();", "return n;", None),
    ("reference_knn_non_finite_norm_kept", "dnnrl_ext/reference.py",
     'return torch.where(torch.isfinite(n), n, torch.full_like(n, float("nan")))', "return n", None),
    ("vote_tie_to_last_class", "csrc/cpu/knn_cpu.cpp", "if (score > best_score) {", "if (score >= best_score) {",
     "scores votes * (k + 1) + (k - first rank) are distinct for every class with a vote, and k >= 1 "
     "gives some class a vote, so the best score is never tied"),
    ("reference_tie_to_larger_index", "dnnrl_ext/reference.py",
     "first = torch.where(hit, columns, torch.full_like(columns, d.shape[1])).amin(1)",
     "first = torch.where(hit, columns, torch.full_like(columns, -1)).amax(1)", None),
    ("select_k_tie_to_larger_k", "dnnrl_ext/knn.py", "self.k = int(torch.nonzero(acc == best)[0, 0].item()) + 1",
     "self.k = int(torch.nonzero(acc == best)[-1, 0].item()) + 1", None, ["tests/test_knn_classifier.py"]),
    ("reference_vote_tie_to_last_ranked", "dnnrl_ext/reference.py", "score = votes * (k + 1) + (k - first_rank)",
     "score = votes * (k + 1) + first_rank", None),
    ("confusion_transposed", "python/dnnrl/evaluate.py", "idx = (true.long() * num_classes + pred.long()).cpu()",
     "idx = (pred.long() * num_classes + true.long()).cpu()", None, ["tests/test_app_metrics.py"]),
    ("public_test_read_as_test", "python/dnnrl/data.py",
     '_USAGE = {"training": "train", "publictest": "val", "privatetest": "test"}',
     '_USAGE = {"training": "train", "publictest": "test", "privatetest": "val"}', None, ["tests/test_app_data.py"]),
    ("public_test_folder_read_as_test", "python/dnnrl/data.py",
     '"validation": "val", "publictest": "val", "privatetest": "test"}',
     '"validation": "val", "publictest": "test", "privatetest": "val"}', None, ["tests/test_app_data.py"]),
    ("tta_views_not_renormalised", "python/dnnrl/runtime.py",
     "out = torch.nn.functional.normalize(torch.stack(out).sum(0), dim=1)", "out = torch.stack(out).mean(0)", None,
     ["tests/test_app_train.py", "-k", "tta"]),
    ("erase_probability_inverted", "python/dnnrl/transforms.py", "chosen = u[:, 4] < cfg.erase_prob",
     "chosen = u[:, 4] >= cfg.erase_prob", None, ["tests/test_app_transforms.py"]),
    ("pk_walk_does_not_advance", "python/dnnrl/samplers.py", "                pos[c] += self.k\n", "", None,
     ["tests/test_app_samplers.py"]),
    ("protocol_drop_on_any_rise", "python/dnnrl/train.py",
     "not (v <= self.best_val * (1 + self.cfg.rise_threshold))", "not (v <= self.best_val)", None, PROTOCOL_TESTS),
    ("protocol_drop_without_reload", "python/dnnrl/train.py",
     "                    self.model.load_state_dict(self.best_state)\n", "", None, PROTOCOL_TESTS),
    ("protocol_drop_keeps_momentum", "python/dnnrl/train.py",
     "                    self.optimizer = self._optimizer(max(self.lr / 10.0, self.cfg.lr_min))\n", "", None,
     PROTOCOL_TESTS),
    ("protocol_no_lr_floor", "python/dnnrl/train.py", "self._set_lr(max(self.lr / 10.0, self.cfg.lr_min))",
     "self._set_lr(self.lr / 10.0)", None, PROTOCOL_TESTS),
    ("protocol_patience_plus_one", "python/dnnrl/train.py", "self.since_best >= self.cfg.patience",
     "self.since_best > self.cfg.patience", None, PROTOCOL_TESTS),
    ("batch_of_one_accepted", "python/dnnrl/config.py", '"batch_size": _int_at_least(2),',
     '"batch_size": _int_at_least(1),', None, ["tests/test_app_bad_options.py"]),
    ("api_config_not_validated", "python/dnnrl/train.py",
     "    validate(cfg)  # an API caller's own Config, or a resumed run's overrides\n", "", None,
     ["tests/test_app_bad_options.py"]),
    ("bundle_dims_checked_after_embedding", "python/dnnrl/bundle.py",
     "    _check_dims(gallery_dim, sweep_dims, gallery_per_class, cfg.embed_dim)  # before minutes of embedding\n",
     "", None, ["tests/test_app_bad_options.py"]),
    ("pk_batch_larger_than_the_set", "python/dnnrl/samplers.py", "        if p * k > n:  # fewer images than one batch",
     "        if False:", None, ["tests/test_app_samplers.py"]),
    ("no_validation_split_not_carved", "python/dnnrl/runtime.py", "    if need_val:\n        carve_validation(ds)\n",
     "", None, ["tests/test_app_runtime.py"]),
    # added 2026-12-07 (session 17) for the code of sessions 13-16, which no full run had seen
    ("semi_hard_cache_keeps_the_unused_slot", "csrc/cpu/triplet_loss_cpu.cpp",
     "(*cache)[p] = prod.data_ptr() == slot.data_ptr() ? slot : prod;", "(*cache)[p] = slot;", None),
    ("label_smoothing_in_validation", "python/dnnrl/train.py",
     "smoothing = self.cfg.label_smoothing if self.model.training else 0.0",
     "smoothing = self.cfg.label_smoothing", None, ["tests/test_app_train.py", "-k", "label_smoothing"]),
    ("select_by_accuracy_not_its_error", "python/dnnrl/train.py", "            return 1.0 - rec[key]\n",
     "            return rec[key]\n", None, SELECT_TESTS),
    ("select_by_val_accuracy_scores_dnn_by_knn", "python/dnnrl/train.py",
     '"val_accuracy" if self.cfg.method == "dnn" else "val_knn_accuracy"', '"val_knn_accuracy"', None, SELECT_TESTS),
    ("time_budget_ignores_the_next_epoch", "python/dnnrl/train.py",
     "self._spent_seconds() + self._next_epoch_seconds() > self.cfg.time_budget",
     "self._spent_seconds() > self.cfg.time_budget", None, PROTOCOL_TESTS),
    ("time_budget_estimate_counts_the_warm_up", "python/dnnrl/train.py", "timed = self.history[1:] or self.history",
     "timed = self.history", None, PROTOCOL_TESTS),
    ("cosine_ignores_the_time_budget", "python/dnnrl/train.py",
     "progress = max(progress, self._spent_seconds() / self.cfg.time_budget)", "progress = progress", None,
     PROTOCOL_TESTS),
    ("cosine_rises", "python/dnnrl/train.py", "0.5 * (hi - lo) * (1.0 + math.cos(math.pi * progress))",
     "0.5 * (hi - lo) * (1.0 - math.cos(math.pi * progress))", None, PROTOCOL_TESTS),
    ("late_cosine_starts_from_the_initial_lr", "python/dnnrl/train.py", "self.anneal_start_lr = self.lr",
     "self.anneal_start_lr = self.cfg.lr", None, PROTOCOL_TESTS),
    ("folded_copy_left_in_train_mode", "python/dnnrl/model.py", "folded = copy.deepcopy(model).eval()",
     "folded = copy.deepcopy(model)", None, ["tests/test_app_model.py"]),
    ("folded_network_accepts_train", "python/dnnrl/model.py",
     'if mode and getattr(self, "batch_norm_folded", False):', "if False:", None, ["tests/test_app_model.py"]),
    ("reduced_gallery_keeps_the_last_components", "python/dnnrl/bundle.py",
     '"components": proj["components"][:, :dim].contiguous()',
     '"components": proj["components"][:, -dim:].contiguous()', None,
     ["tests/test_app_eval_bundle.py", "-k", "reduce_gallery_dim"]),
    ("ship_a_worse_bundle", "benchmarks/ingest_gpu_session.py", "(new is None or new < old)", "(new is None)", None,
     INGEST_TESTS),
    ("ship_a_gallery_3_points_under_the_full_one", "benchmarks/ingest_gpu_session.py", "acc < acc32 - 0.003",
     "acc < acc32 - 0.03", None, INGEST_TESTS),
    ("global_gather_drops_the_own_gradient", "dnnrl_ext/distributed.py", "    parts[rank] = x\n", "", None,
     DISTRIBUTED_TESTS),
    ("global_loss_gradient_not_scaled_by_world", "dnnrl_ext/distributed.py",
     "loss = _ScaleGrad.apply(out.loss, float(W))", "loss = out.loss", None, DISTRIBUTED_TESTS),
    ("local_sum_gradient_not_scaled_by_world", "dnnrl_ext/distributed.py",
     'scale = float(W) if self.reduction == "sum" else 1.0', "scale = 1.0", None, DISTRIBUTED_TESTS),
    ("crop_past_the_border_pasted_at_the_corner", "python/dnnrl/faces.py",
     "canvas[y0 - y:y1 - y, x0 - x:x1 - x] = gray[y0:y1, x0:x1]", "canvas[:y1 - y0, :x1 - x0] = gray[y0:y1, x0:x1]",
     None, ["tests/test_app_predict.py"]),
    ("face_crop_resized_nearest", "python/dnnrl/faces.py", ".resize((size, size), Image.BILINEAR)",
     ".resize((size, size), Image.NEAREST)", None, ["tests/test_app_predict.py"]),
    ("box_grown_on_one_side", "python/dnnrl/faces.py", "int(round(w + 2 * dx)), int(round(h + 2 * dy))",
     "int(round(w + dx)), int(round(h + dy))", None, ["tests/test_app_predict.py"]),
    ("gallery_query_not_centred", "python/dnnrl/bundle.py", "return (t.float() - m) @ c", "return t.float() @ c",
     None, BUNDLE_TESTS),
    ("vote_shares_not_divided_by_k", "python/dnnrl/bundle.py", "return pred, votes.float() / self.k",
     "return pred, votes.float()", None, BUNDLE_TESTS),
    ("pca_keeps_the_least_variance", "python/dnnrl/bundle.py", "torch.argsort(evals, descending=True)[:dim]",
     "torch.argsort(evals, descending=False)[:dim]", None, BUNDLE_TESTS),
    ("auto_gallery_dim_forgets_the_components", "python/dnnrl/bundle.py",
     "d = int((limit_bytes - base) // (2 * rows + 4 * dim))", "d = int((limit_bytes - base) // (2 * rows))", None,
     BUNDLE_TESTS),
    ("per_class_accuracy_is_precision", "python/dnnrl/evaluate.py", "float(cm[i, i] / cm[i].sum())",
     "float(cm[i, i] / cm[:, i].sum())", None, ["tests/test_app_metrics.py"]),
    ("dnn_scored_by_knn", "python/dnnrl/evaluate.py",
     "preds[s] = embed(model, data[s][0], head=True, **kw).argmax(1)", "preds[s] = clf.predict(emb[s])", None,
     ["tests/test_app_metrics.py", "tests/test_app_train.py"]),
    ("k_not_chosen_on_validation", "python/dnnrl/evaluate.py",
     'val=(emb["val"], labels["val"]) if has_val else None, k_max=k_max)', "val=None, k_max=k_max)", None,
     ["tests/test_app_metrics.py", "tests/test_app_train.py"]),
    ("csv_pixels_read_column_major", "python/dnnrl/data.py", "img = values.astype(np.uint8).reshape(side, side)\n",
     "img = values.astype(np.uint8).reshape(side, side).T\n", None, ["tests/test_app_data.py"]),
    ("cache_ignores_a_changed_source", "python/dnnrl/data.py",
     "ident = [os.path.abspath(path), _fingerprint(path), sorted(options.items()), _CACHE_VERSION]",
     "ident = [os.path.abspath(path), sorted(options.items()), _CACHE_VERSION]", None, ["tests/test_app_data.py"]),
    ("train_flip_mirrors_vertically", "python/dnnrl/transforms.py",
     "t00, t10 = t00 * sign, t10 * sign", "t01, t11 = t01 * sign, t11 * sign", None,
     ["tests/test_app_transforms.py", "tests/test_app_train.py"]),
    ("train_flip_never_drawn", "python/dnnrl/transforms.py", "sign = torch.where(u_flip < 0.5, -1.0, 1.0)",
     "sign = torch.where(u_flip < 0.0, -1.0, 1.0)", None, ["tests/test_app_transforms.py", "tests/test_app_train.py"]),
    ("tta_mirror_is_vertical", "python/dnnrl/runtime.py", "views += [x, torch.flip(x, dims=[-1])] if aug.tta_flip",
     "views += [x, torch.flip(x, dims=[-2])] if aug.tta_flip", None, ["tests/test_app_train.py", "-k", "tta"]),
    ("easy_positive_takes_the_farthest", "python/dnnrl/train.py",
     'pos = d.masked_fill(~pos_mask, float("inf")).argmin(1)', 'pos = d.masked_fill(~pos_mask, -1.0).argmax(1)', None,
     ["tests/test_app_train.py"]),
    ("easy_positive_keeps_anchors_without_negatives", "python/dnnrl/train.py",
     "        keep = pos_mask.any(1) & neg_mask.any(1)", "        keep = pos_mask.any(1)", None,
     ["tests/test_app_train.py"]),
    ("explicit_mean_over_every_anchor", "python/dnnrl/train.py",
     "loss = loss / keep.sum().clamp(min=1).to(per.dtype)", "loss = loss / B", None, ["tests/test_app_train.py"]),
    ("easy_positive_always_formed_in_python", "python/dnnrl/train.py", '    return value == "1"\n',
     "    return True\n", None, ["tests/test_app_train.py", "-k", "easy_positive"]),
    ("easy_positive_in_python_switch_ignored", "python/dnnrl/train.py", '    return value == "1"\n',
     "    return False\n", None, ["tests/test_app_train.py", "-k", "easy_positive"]),
    ("tdnn_trains_the_exp_loss_on_explicit_triplets", "python/dnnrl/train.py",
     'ExplicitTripletLoss("exp" if cfg.method == "dnnrl" else "hinge"', 'ExplicitTripletLoss("exp"', None,
     ["tests/test_app_train.py", "tests/test_app_reproduce.py"]),
    ("pre_ampere_card_accepted", "dnnrl_ext/_extension.py", "if (major, minor) < MIN_CUDA_CAPABILITY:",
     "if (major, minor) < (7, 0):", None, ["tests/test_bad_input.py", "-k", "ampere"]),
    # a resumed run continues the interrupted one exactly (its RNG streams, momentum and log)
    ("resume_forgets_the_augmentation_rng", "python/dnnrl/train.py",
     '        self.aug_gen.set_state(rng["aug"].cpu() if self.device.type == "cpu" else rng["aug"])\n', "", None,
     RESUME_TESTS),
    ("resume_forgets_the_sampler_rng", "python/dnnrl/train.py",
     '        self.sample_gen.set_state(rng["sample"].cpu())\n',
     "", None, RESUME_TESTS),
    ("resume_forgets_the_triplet_rng", "python/dnnrl/train.py", 'if rng.get("triplet") is not None:', "if False:", None,
     RESUME_TESTS),
    ("resume_forgets_the_momentum", "python/dnnrl/train.py",
     '        self.optimizer.load_state_dict(st["optimizer"])\n',
     "", None, RESUME_TESTS),
    ("resume_appends_the_log", "python/dnnrl/train.py",
     'with open(os.path.join(self.run_dir, "log.jsonl"), "w") as fh:',
     'with open(os.path.join(self.run_dir, "log.jsonl"), "a") as fh:', None, RESUME_TESTS),
    # the per-epoch k-NN monitor: best k <= 20, two flip views only
    ("monitor_takes_k_1", "python/dnnrl/train.py",
     "        return float(acc.max())\n", "        return float(acc[0])\n",
     None, ["tests/test_app_train.py"]),
    ("monitor_embeds_ten_views", "python/dnnrl/train.py", "aug = dataclasses.replace(self.aug, tta_shift=0.0)",
     "aug = self.aug", None, ["tests/test_app_train.py"]),
    # bf16 autocast: "auto" means on for CUDA only, "bf16" on everywhere, "off" never
    ("amp_auto_on_the_cpu", "python/dnnrl/runtime.py",
     'return mode == "bf16" or (mode == "auto" and device.type == "cuda")',
     'return mode == "bf16" or mode == "auto"', None, AMP_TESTS),
    ("amp_bf16_ignored", "python/dnnrl/runtime.py",
     'return mode == "bf16" or (mode == "auto" and device.type == "cuda")',
     'return mode == "auto" and device.type == "cuda"', None, AMP_TESTS),
    # videos: every Nth frame, stamped with its own frame number and time
    ("video_every_ignored", "python/dnnrl/predict.py", "                if i % every == 0:\n",
     "                if True:\n", None, ["tests/test_app_predict.py", "-k", "video"]),
    ("video_time_counts_kept_frames", "python/dnnrl/predict.py", 'rec["time_s"] = i / fps if fps > 0 else None',
     'rec["time_s"] = got / fps if fps > 0 else None', None, ["tests/test_app_predict.py", "-k", "video"]),
    # a resumed run takes from the command line only its length and the machine's options
    ("resume_applies_every_given_option", "python/dnnrl/train.py",
     "else set(resume_given) & set(RESUME_OVERRIDABLE)", "else set(resume_given)", None, RESUME_TESTS),
    ("resume_writes_where_first_run", "python/dnnrl/train.py",
     "        saved.out = cfg.out  # the directory it is resumed in, wherever it was first written\n", "", None,
     RESUME_TESTS),
    # the network: unit-norm embeddings from both forward paths
    ("embedding_not_normalised", "python/dnnrl/model.py", "return F.normalize(self.features(x).float(), dim=1)",
     "return self.features(x).float()", None, ["tests/test_app_model.py", "tests/test_app_train.py"]),
    ("joint_embedding_not_normalised", "python/dnnrl/model.py", "return F.normalize(f.float(), dim=1), self.head(f)",
     "return f.float(), self.head(f)", None, ["tests/test_app_model.py", "tests/test_app_train.py"]),
    # the geometry of the transforms, and erasing to the mean grey
    ("eval_face_scaled_the_wrong_way", "python/dnnrl/transforms.py",
     "theta[:, 0, 0] = theta[:, 1, 1] = crop / resize", "theta[:, 0, 0] = theta[:, 1, 1] = resize / crop", None,
     ["tests/test_app_transforms.py"]),
    ("rotation_becomes_a_shear", "python/dnnrl/transforms.py",
     "t00, t01, t02 = k * cos * h, k * sin * h,",
     "t00, t01, t02 = k * cos * h, -k * sin * h,",
     None, ["tests/test_app_transforms.py"]),
    ("erase_fills_black", "python/dnnrl/transforms.py", "out.masked_fill_(mask[:, None], 0.0)",
     "out.masked_fill_(mask[:, None], -PIXEL_MEAN / PIXEL_STD)", None, ["tests/test_app_transforms.py"]),
    # P x K batches: a random choice of P classes when there are more
    ("pk_always_the_first_classes", "python/dnnrl/samplers.py",
     "chosen = torch.randperm(C, generator=g, device=g.device)[: self.p].tolist()", "chosen = list(range(self.p))",
     None, ["tests/test_app_samplers.py"]),
    # the distributed shards of a batch or a gallery cover each row once
    ("shards_overlap", "dnnrl_ext/distributed.py", "start = rank * base + min(rank, extra)", "start = rank * base",
     None, DISTRIBUTED_TESTS + ["tests/test_app_distributed.py"]),
    # dnnrl reproduce: the paper's figures, the table's columns, what a rerun keeps
    ("paper_tdnn_and_dnn_swapped", "python/dnnrl/reproduce.py",
     'PAPER_TEST_ACCURACY = {"dnnrl": 0.7060, "tdnn": 0.7013, "dnn": 0.6922}',
     'PAPER_TEST_ACCURACY = {"dnnrl": 0.7060, "tdnn": 0.6922, "dnn": 0.7013}', None, REPRODUCE_TESTS),
    ("table_val_and_test_swapped", "python/dnnrl/reproduce.py",
     'r["name"], _pct(r["val_accuracy"]), _pct(r["test_accuracy"])',
     'r["name"], _pct(r["test_accuracy"]), _pct(r["val_accuracy"])', None, REPRODUCE_TESTS),
    ("reproduce_restarts_an_interrupted_method", "python/dnnrl/reproduce.py",
     "resume = is_unfinished_run(run_dir) and not args.force", "resume = False", None, REPRODUCE_TESTS),
    ("reproduce_drops_erase", "python/dnnrl/reproduce.py", '"softmax_weight", "select_by", "erase",',
     '"softmax_weight", "select_by",', None, REPRODUCE_TESTS),
    # Kaggle folders: the file-name prefix names the split, classes in FER-2013's label order
    ("kaggle_file_prefix_ignored", "python/dnnrl/data.py", "                split = s\n                break\n",
     "                break\n", None, ["tests/test_app_data.py"]),
    ("class_folders_in_alphabetical_order", "python/dnnrl/data.py",
     "return (list(CLASS_NAMES) + extra) if names & set(CLASS_NAMES) else extra",
     "return sorted(names)", None, ["tests/test_app_data.py"]),
    ("images_in_archive_order", "python/dnnrl/data.py",
     "            rows.sort(key=lambda r: r[0])  # deterministic order whatever the archive order\n", "", None,
     ["tests/test_app_data.py"]),
    ("lr_min_above_lr_accepted", "python/dnnrl/config.py", "    if cfg.lr_min > cfg.lr:", "    if False:", None,
     ["tests/test_app_bad_options.py"]),
    # dnnrl predict: faces of many images embedded together, records in input order
    ("batched_faces_not_split_back", "python/dnnrl/predict.py", "            at += n\n", "", None,
     ["tests/test_app_predict.py"]),
    ("error_record_jumps_the_queue", "python/dnnrl/predict.py",
     "            if gray is None:\n                if not pending:",
     "            if gray is None:\n                if True:", None, ["tests/test_app_predict.py"]),
    # distributed runs: the merged top-k's tie order, per-rank augmentation streams
    ("merge_topk_in_shard_order", "python/dnnrl/distributed.py",
     "    o = torch.sort(i, dim=1, stable=True).indices\n    d, i = d.gather(1, o), i.gather(1, o)\n", "", None,
     ["tests/test_app_distributed.py"]),
    ("every_rank_same_augmentation", "python/dnnrl/distributed.py",
     "return (seed * 1_000_003 + epoch * 10_007 + rank * 101) % (2 ** 63)",
     "return (seed * 1_000_003 + epoch * 10_007) % (2 ** 63)", None, ["tests/test_app_distributed.py"]),
    # the packaged model: a cut gallery keeps its leading components, the per-class cap
    ("reduced_projection_takes_the_last_components", "python/dnnrl/bundle.py",
     '"components": proj["components"][:, :dim].contiguous()}',
     '"components": proj["components"][:, -dim:].contiguous()}',
     None, BUNDLE_TESTS),
    ("gallery_per_class_one_over", "python/dnnrl/bundle.py", "rng.permutation(np.flatnonzero(labels == c))[:per_class]",
     "rng.permutation(np.flatnonzero(labels == c))[:per_class + 1]", None, BUNDLE_TESTS),
    # the drop-in modules: their arguments reach the op, and their defaults are the paper's
    ("exp_module_drops_alpha", "dnnrl_ext/loss.py", "alpha=self.alpha, gamma=self.gamma",
     "alpha=0.2, gamma=self.gamma", None),
    ("exp_module_drops_gamma", "dnnrl_ext/loss.py", "alpha=self.alpha, gamma=self.gamma",
     "alpha=self.alpha, gamma=0.0", None),
    ("hinge_module_drops_margin", "dnnrl_ext/loss.py", "margin=self.margin, gamma=0.0", "margin=0.2, gamma=0.0", None),
    ("exp_module_ignores_reduction", "dnnrl_ext/loss.py", "gamma=self.gamma, reduction=self.reduction",
     'gamma=self.gamma, reduction="mean"', None),
    ("exp_module_default_alpha", "dnnrl_ext/loss.py", "def __init__(self, alpha: float = 0.2,",
     "def __init__(self, alpha: float = 0.1,", None),
    ("exp_module_default_semi_hard", "dnnrl_ext/loss.py", 'gamma: float = 0.0, mining: str = "batch_hard"',
     'gamma: float = 0.0, mining: str = "semi_hard"', None),
    # the wrappers' argument checks, and the fake (meta) shapes that torch.compile and opcheck use
    ("finite_check_lets_minus_inf", "dnnrl_ext/ops.py", "    if not math.isfinite(value):\n",
     '    if value != value or value == float("inf"):\n', None),
    ("alpha_sign_unchecked", "dnnrl_ext/ops.py", "if loss_code == ref.EXP and alpha <= 0:",
     "if loss_code == ref.EXP and alpha < -1e300:", None),
    ("classifier_lets_non_finite_rows_in", "dnnrl_ext/knn.py", "    if bool(bad.any()):\n",
     "    if False:\n", None),
    ("labels_length_unchecked", "dnnrl_ext/ops.py", "if length is not None and t.shape[0] != length:",
     "if False:", None),
    ("labels_device_unchecked", "dnnrl_ext/ops.py", "    if t.device != device:\n        raise",
     "    if False:\n        raise", None),
    ("triplet_index_past_the_end", "dnnrl_ext/ops.py", "if lo < 0 or hi >= B:", "if lo < 0 or hi > B:", None),
    ("triplet_index_minus_one", "dnnrl_ext/ops.py", "if lo < 0 or hi >= B:", "if lo < -1 or hi >= B:", None),
    ("knn_k_past_the_gallery", "dnnrl_ext/ops.py", "if not 1 <= k <= gallery.shape[0]:",
     "if not 1 <= k <= gallery.shape[0] + 1:", None),
    ("knn_bool_k", "dnnrl_ext/ops.py", "if isinstance(k, bool) or not isinstance(k, int):",
     "if not isinstance(k, int):", None),
    ("knn_dtypes_mixed", "dnnrl_ext/ops.py", "if query.dtype != gallery.dtype:", "if False:", None),
    ("knn_dims_mixed", "dnnrl_ext/ops.py", "if query.shape[1] != gallery.shape[1]:", "if False:", None),
    ("knn_devices_mixed", "dnnrl_ext/ops.py", "if query.device != gallery.device:", "if False:", None),
    ("vote_label_past_num_classes", "dnnrl_ext/ops.py", "if lo < 0 or hi >= num_classes:",
     "if lo < 0 or hi > num_classes:", None),
    ("vote_zero_classes", "dnnrl_ext/ops.py", "or num_classes < 1:", "or num_classes < 0:", None),
    ("fake_loss_shape_swapped", "dnnrl_ext/ops.py",
     "loss = x.new_empty((B,) if reduction == ref.NONE else (), dtype=acc)",
     "loss = x.new_empty(() if reduction == ref.NONE else (B,), dtype=acc)", None),
    ("fake_knn_dist_in_input_dtype", "dnnrl_ext/ops.py", "return query.new_empty((Q, k), dtype=_acc(query.dtype)),",
     "return query.new_empty((Q, k), dtype=query.dtype),", None),
    ("fake_indexed_r_shape", "dnnrl_ext/ops.py", "dtype=acc), x.new_empty((T,), dtype=acc)",
     "dtype=acc), x.new_empty((), dtype=acc)", None),
    # KNNClassifier: k chosen on validation data, vote shares, label checks, queries cast to the gallery
    ("accuracy_per_k_tie_to_later_rank", "dnnrl_ext/knn.py",
     "score = counts * (k_max + 1) + (k_max - first)[:, None, :]",
     "score = counts * (k_max + 1) + first[:, None, :]", None),
    ("select_k_ties_to_larger_k", "dnnrl_ext/knn.py", "torch.nonzero(acc == best)[0, 0]",
     "torch.nonzero(acc == best)[-1, 0]", None),
    ("proba_over_num_classes", "dnnrl_ext/knn.py", "return votes.float() / self.k",
     "return votes.float() / self.num_classes", None),
    ("negative_labels_accepted", "dnnrl_ext/knn.py", "if n and int(t.min()) < 0:", "if n and int(t.min()) < -1:", None),
    ("fit_label_past_num_classes", "dnnrl_ext/knn.py", "elif seen > self.num_classes:",
     "elif seen > self.num_classes + 1:", None),
    ("k_max_not_capped", "dnnrl_ext/knn.py", "k_max = min(int(k_max), self.gallery.shape[0])",
     "k_max = int(k_max)", None),
    ("state_dict_k_lost", "dnnrl_ext/knn.py", 'clf = cls(k=state["k"],', "clf = cls(k=1,", None),
    ("count_accepts_bool", "dnnrl_ext/knn.py",
     "if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:",
     "if not isinstance(value, numbers.Integral) or value < 1:", None),
    ("float_labels_accepted", "dnnrl_ext/knn.py",
     "if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:",
     "if t.is_complex():", None),
    ("kneighbors_ignores_k", "dnnrl_ext/knn.py", "self.k if k is None else k, backend", "self.k, backend", None),
    ("query_not_cast_to_gallery", "dnnrl_ext/knn.py",
     'q = _as_float_tensor("embeddings", x, self.gallery.device).to(self.gallery.dtype)',
     'q = _as_float_tensor("embeddings", x, self.gallery.device)', None),
    # the C++ autograd: the backward reuses the positive and negative the forward mined
    ("mined_backward_swaps_positive_and_negative", "csrc/autograd.cpp", "saved[0], std::nullopt, saved[1], saved[2],",
     "saved[0], std::nullopt, saved[2], saved[1],", None),
    # the built-in synthetic data: balanced, seeded, independent splits whose images carry the label
    ("synthetic_one_expression", "python/dnnrl/synthetic.py", "p = _EXPR[labels] +", "p = _EXPR[labels * 0] +", None,
     SYNTHETIC_TESTS),
    ("synthetic_seed_ignored", "python/dnnrl/synthetic.py", "rng = np.random.default_rng(seed)",
     "rng = np.random.default_rng(0)", None, SYNTHETIC_TESTS),
    ("synthetic_generator_restarted_per_split", "python/dnnrl/synthetic.py", "splits[name] = _split(n, rng, size)",
     "splits[name] = _split(n, np.random.default_rng(seed), size)", None, SYNTHETIC_TESTS),
    ("synthetic_empty_split_kept", "python/dnnrl/synthetic.py", "        if n > 0:", "        if n >= 0:", None,
     SYNTHETIC_TESTS),
    ("synthetic_labels_drawn_at_random", "python/dnnrl/synthetic.py",
     "labels = np.repeat(np.arange(len(CLASS_NAMES)), n_per_class)",
     "labels = rng.integers(0, len(CLASS_NAMES), len(CLASS_NAMES) * n_per_class)", None, SYNTHETIC_TESTS),
    # dnnrl eval / embed: the best weights, best.pt first, the options over the run's settings
    ("eval_takes_the_last_weights", "python/dnnrl/cli.py", 'model_state = st.get("best_state") or st["model"]',
     'model_state = st["model"]', None, CLI_TESTS),
    ("eval_dir_prefers_the_checkpoint", "python/dnnrl/cli.py", 'for name in ("best.pt", "checkpoint.pt"):',
     'for name in ("checkpoint.pt", "best.pt"):', None, CLI_TESTS),
    ("eval_ignores_tta", "python/dnnrl/cli.py", '"eval_batch_size", "cache_dir", "tta"):',
     '"eval_batch_size", "cache_dir"):', None, CLI_TESTS),
    ("eval_ignores_backend", "python/dnnrl/cli.py", 'for k in ("device", "backend", "amp",',
     'for k in ("device", "amp",', None, CLI_TESTS),
    ("eval_dnn_on_other_classes", "python/dnnrl/cli.py", 'if for_eval and cfg.method == "dnn":',
     "if False:", None, CLI_TESTS),
    ("bundle_eval_scores_train_too", "python/dnnrl/cli.py",
     'scored = [s for s in ("val", "test") if s in ds.splits] or list(ds.splits)',
     "scored = list(ds.splits)",
     "evaluate_bundle scores only val and test itself; the filter only spares placing the training split",
     CLI_TESTS),
    ("bundle_eval_ignores_tta", "python/dnnrl/cli.py", 'for k in ("amp", "eval_batch_size", "tta"):',
     'for k in ("amp", "eval_batch_size"):', None, CLI_TESTS),
    ("cli_error_exit_1", "python/dnnrl/cli.py", "        return 2\n", "        return 1\n", None, CLI_TESTS),
    ("resume_given_every_option", "python/dnnrl/cli.py", "resume=args.resume, resume_given=given,",
     "resume=args.resume, resume_given=list(over),", None, CLI_TESTS),
    ("embed_skips_a_split", "python/dnnrl/cli.py", "    for s, (x, y) in data.items():\n        out[",
     "    for s, (x, y) in list(data.items())[:-1]:\n        out[", None, CLI_TESTS),
    # DistributedLoss: the local scope's mean and value, the shards of global_batch, the padding cut
    ("local_mean_not_divided_by_world", "dnnrl_ext/distributed.py", "total = total / W",
     "total = total / 1", None, DISTRIBUTED_TESTS),
    ("global_batch_shard_not_checked", "dnnrl_ext/distributed.py", "        if sizes[rank] != n_local:",
     "        if False:", None, DISTRIBUTED_TESTS),
    ("gathered_padding_kept", "dnnrl_ext/distributed.py", "return [t[:s] for t, s in zip(out, sizes)]",
     "return out", None, DISTRIBUTED_TESTS),
    ("global_batch_bool_accepted", "dnnrl_ext/distributed.py",
     "if global_batch is not None and (isinstance(global_batch, bool) or",
     "if global_batch is not None and (", None, DISTRIBUTED_TESTS),
    ("local_scope_value_is_the_local_loss", "dnnrl_ext/distributed.py", "+ (total - out.loss.detach())",
     "", None, DISTRIBUTED_TESTS),
    # dnnrl predict: --k, float32 on the CPU, the table's runner-up, CSV columns, the detector's box order
    ("predict_k_ignored", "python/dnnrl/predict.py", "        if k is not None:\n            self.classifier.k = min(",
     "        if False:\n            self.classifier.k = min(", None, PREDICT_TESTS),
    ("predict_k_not_capped", "python/dnnrl/predict.py", "self.classifier.k = min(k, self.classifier.gallery.shape[0])",
     "self.classifier.k = k", None, PREDICT_TESTS),
    ("runner_up_may_be_the_winner", "python/dnnrl/predict.py",
     'runner = [kv for kv in ranked if kv[0] != f["expression"]][:1]',
     "runner = ranked[:1]", None, PREDICT_TESTS),
    ("csv_no_face_row_one_short", "python/dnnrl/predict.py", '[""] * (7 + len(class_names))',
     '[""] * (6 + len(class_names))', None, PREDICT_TESTS),
    ("csv_shares_unordered", "python/dnnrl/predict.py", '["%.4f" % f["scores"][n] for n in class_names]',
     '["%.4f" % v for v in sorted(f["scores"].values())]', None, PREDICT_TESTS),
    ("predict_exit_0_with_failures", "python/dnnrl/predict.py", "return 1 if failed else 0",
     "return 0", None, PREDICT_TESTS),
    ("faces_not_largest_first", "python/dnnrl/faces.py",
     'order = np.argsort(-(boxes[:, 2] * boxes[:, 3]), kind="stable")',
     "order = np.arange(len(boxes))", None, PREDICT_TESTS),
    ("nested_boxes_kept", "python/dnnrl/faces.py", "if all(_inter(b, k) <= overlap * area for k in keep):",
     "if True:", None, PREDICT_TESTS),
    ("predict_amp_on_cpu", "python/dnnrl/predict.py",
     'self.amp = self.config.amp if self.device.type == "cuda" else "off"',
     'self.amp = "bf16"', None, PREDICT_TESTS),
    ("output_keeps_image", "python/dnnrl/predict.py", 'if k not in ("image", "fps")',
     'if k not in ("fps",)', None, PREDICT_TESTS),
    # the config: the preset follows the data, explicit options beat it, the option combinations
    ("preset_default_ignores_data", "python/dnnrl/config.py", '("cpu" if not given.get("data") else "paper")',
     '"cpu"', None, CONFIG_TESTS),
    ("preset_beats_explicit_options", "python/dnnrl/config.py",
     "    values = dict(PRESETS[preset])\n    values.update(given)\n",
     "    values = dict(given)\n    values.update(PRESETS[preset])\n", None, CONFIG_TESTS),
    ("unknown_preset_accepted", "python/dnnrl/config.py", "    if preset not in PRESETS:\n",
     "    if False:\n", None, CONFIG_TESTS),
    ("cuda_graph_with_compile_accepted", "python/dnnrl/config.py", 'if cfg.cuda_graph == "on" and cfg.compile:',
     "if False:", None, CONFIG_TESTS),
    ("none_overrides_kept", "python/dnnrl/config.py", "given = {k: v for k, v in overrides.items() if v is not None}",
     "given = dict(overrides)", None, CONFIG_TESTS),
    # runtime: the carved validation split, stratified seeded subsets, memory-format modes, device names
    ("empty_val_split_kept", "python/dnnrl/runtime.py", 'if len(ds.splits.get("val", ((), ()))[1]) > 0 or',
     'if "val" in ds.splits or', None, RUNTIME_TESTS),
    ("subset_not_stratified", "python/dnnrl/runtime.py", "    quota = n * counts / y.size\n",
     "    quota = np.full(counts.shape, n / counts.size)\n", None, RUNTIME_TESTS),
    ("subset_rounded_per_class", "python/dnnrl/runtime.py",
     "        take[np.argsort(-remainder, kind=\"stable\")[:short]] += 1\n", "        pass\n", None, RUNTIME_TESTS),
    ("channels_last_auto_cuda_only", "python/dnnrl/runtime.py", 'device.type in ("cuda", "cpu"))',
     'device.type in ("cuda",))', None, RUNTIME_TESTS),
    ("device_index_one_past", "python/dnnrl/runtime.py", "dev.index is not None and dev.index >= count",
     "dev.index is not None and dev.index > count", None, RUNTIME_TESTS),
    ("subset_draw_follows_no_seed", "python/dnnrl/runtime.py", "rng = np.random.default_rng(cfg.seed + 1)",
     "rng = np.random.default_rng(1)", None, RUNTIME_TESTS),
    ("carve_leaves_the_training_split_whole", "python/dnnrl/runtime.py",
     '    ds.splits["train"] = (x[~is_val], y[~is_val])\n',
     "", None, RUNTIME_TESTS),
    ("carve_single_image_classes", "python/dnnrl/runtime.py", "        if members.size >= 2:",
     "        if members.size >= 1:", None, RUNTIME_TESTS),
    # reading data: class aliases, Mac leftovers, stray folders, the stratified hash split, each CSV row check
    ("class_alias_ignored", "python/dnnrl/data.py", "    return ALIASES.get(n, n)\n",
     "    return n\n", None, ["tests/test_app_data.py"]),
    ("macos_resource_forks_read", "python/dnnrl/data.py",
     'if len(parts) < 2 or parts[-1].startswith("._") or "__MACOSX" in parts:',
     "if len(parts) < 2:", None, ["tests/test_app_data.py"]),
    ("stray_files_outside_splits_kept", "python/dnnrl/data.py", "            if s is not None:  # stray files",
     "            if True:  # stray files", None, ["tests/test_app_data.py"]),
    ("flat_split_not_stratified", "python/dnnrl/data.py",
     "            by_class.setdefault(index[c], []).append((rel, index[c], img))",
     "            by_class.setdefault(0, []).append((rel, index[c], img))", None, ["tests/test_app_data.py"]),
    ("flat_split_val_and_test_swapped", "python/dnnrl/data.py", '            buckets["val"] += rows[:n_val]\n',
     '            buckets["test"] += rows[:n_val]\n', None, ["tests/test_app_data.py"]),
    ("csv_label_7_accepted", "python/dnnrl/data.py", "if not 0 <= label < len(CLASS_NAMES):",
     "if not 0 <= label <= len(CLASS_NAMES):", None, ["tests/test_app_data.py"]),
    ("csv_non_square_accepted", "python/dnnrl/data.py", "if values.size == 0 or side * side != values.size:",
     "if values.size == 0:", None, ["tests/test_app_data.py"]),
    ("csv_pixel_range_unchecked", "python/dnnrl/data.py", "if values.min() < 0 or values.max() > 255:",
     "if values.min() < 0:", None, ["tests/test_app_data.py"]),
    ("csv_short_row_accepted", "python/dnnrl/data.py", "                if len(row) < len(header):\n",
     "                if False:\n", None, ["tests/test_app_data.py"]),
    ("csv_blank_rows_are_errors", "python/dnnrl/data.py",
     "            if not row or all(not c.strip() for c in row):\n                continue\n",
     "            if not row:\n                continue\n", None, ["tests/test_app_data.py"]),
    ("csv_header_case_sensitive", "python/dnnrl/data.py", "header = [h.strip().lower() for h in next(reader)]",
     "header = [h.strip() for h in next(reader)]", None, ["tests/test_app_data.py"]),
    ("csv_unknown_usage_is_train", "python/dnnrl/data.py",
     "                    if split is None:\n                        raise ValueError",
     "                    if False:\n                        raise ValueError", None, ["tests/test_app_data.py"]),
    ("csv_no_usage_all_train", "python/dnnrl/data.py",
     's = "val" if h < val_fraction else "test" if h < val_fraction + test_fraction else "train"',
     's = "train"', None, ["tests/test_app_data.py"]),
    ("csv_resize_nearest", "python/dnnrl/data.py",
     "img = np.asarray(Image.fromarray(img).resize((image_size, image_size), Image.BILINEAR))",
     "img = np.asarray(Image.fromarray(img).resize((image_size, image_size), Image.NEAREST))",
     None, ["tests/test_app_data.py"]),
    ("bad_image_skipped_without_skip_bad", "python/dnnrl/data.py",
     "            if not skip_bad:\n                raise\n",
     "            if False:\n                raise\n", None, ["tests/test_app_data.py"]),
    # the transforms: both ends of jitter and rotation, independent crop offsets, test-time shifts, erasing
    ("scale_jitter_one_sided", "python/dnnrl/transforms.py", "size = resize + (2 * u_size - 1) * jitter",
     "size = resize + u_size * jitter", None, TRANSFORM_TESTS),
    ("rotation_one_sided", "python/dnnrl/transforms.py", "angle = (2 * u_angle - 1) * math.radians(cfg.rotation)",
     "angle = u_angle * math.radians(cfg.rotation)", None, TRANSFORM_TESTS),
    ("crop_offset_x_only", "python/dnnrl/transforms.py", "ox, oy = u_x * span, u_y * span",
     "ox, oy = u_x * span, u_x * span", None, TRANSFORM_TESTS),
    ("rotation_in_degrees_as_radians", "python/dnnrl/transforms.py", "* math.radians(cfg.rotation)",
     "* cfg.rotation", None, TRANSFORM_TESTS),
    ("eval_shift_y_ignored", "python/dnnrl/transforms.py", "theta[:, 1, 2] = -2.0 * shift[1] * f / resize",
     "theta[:, 1, 2] = 0.0", None, TRANSFORM_TESTS),
    ("eval_shift_not_scaled", "python/dnnrl/transforms.py", "theta[:, 0, 2] = -2.0 * shift[0] * f / resize ",
     "theta[:, 0, 2] = -2.0 * shift[0] / resize ", None, TRANSFORM_TESTS),
    ("tta_shifts_not_diagonal", "python/dnnrl/transforms.py", "[(-t, -t), (t, -t), (-t, t), (t, t)]",
     "[(-t, 0.0), (t, 0.0), (0.0, -t), (0.0, t)]", None, TRANSFORM_TESTS),
    ("pixels_not_normalised", "python/dnnrl/transforms.py", "return out.sub_(PIXEL_MEAN).div_(PIXEL_STD)",
     "return out", None, TRANSFORM_TESTS),
    ("pad_outside_face_is_edge", "python/dnnrl/transforms.py", 'padding_mode="zeros"',
     'padding_mode="border"', None, TRANSFORM_TESTS),
    ("erase_area_unclamped_height", "python/dnnrl/transforms.py",
     "h = torch.sqrt(area * aspect).clamp(max=size)",
     "h = torch.sqrt(area * aspect)",
     "a height past the image covers every row either way: top = u (size - h) <= 0 and top + h >= size",
     TRANSFORM_TESTS),
    ("erase_drawn_at_zero_probability", "python/dnnrl/transforms.py", "    if cfg.erase_prob > 0:  # (skipped",
     "    if cfg.erase_prob >= 0:  # (skipped", None, TRANSFORM_TESTS),
    # the samplers: a fresh permutation per epoch, batches capped at the set, P and K's limits
    ("random_same_permutation_every_epoch", "python/dnnrl/samplers.py",
     "perm = to_device(torch.randperm(self.n, generator=generator, device=generator.device), self.device)",
     "perm = to_device(torch.randperm(self.n, generator=torch.Generator().manual_seed(0)), self.device)",
     None, ["tests/test_app_samplers.py"]),
    ("random_batch_not_capped_at_n", "python/dnnrl/samplers.py",
     "        if num_samples < batch_size:\n            batch_size = num_samples\n",
     "", None, ["tests/test_app_samplers.py"]),
    ("pk_small_class_takes_fewer", "python/dnnrl/samplers.py",
     "parts.append(m[torch.randint(m.numel(), (self.k,), generator=g, device=g.device).cpu()])",
     "parts.append(m)", None, ["tests/test_app_samplers.py"]),
    ("pk_p_not_capped", "python/dnnrl/samplers.py", "self.p, self.k = min(p, classes.numel()), k",
     "self.p, self.k = p, k", None, ["tests/test_app_samplers.py"]),
    ("pk_k_below_two", "python/dnnrl/samplers.py", "        k = max(2, batch_size // p)\n",
     "        k = max(1, batch_size // p)\n", None, ["tests/test_app_samplers.py"]),
    ("pk_default_p_one", "python/dnnrl/samplers.py", "p = min(p or num_classes, num_classes)",
     "p = min(p or 1, num_classes)", None, ["tests/test_app_samplers.py"]),
    # exporting a bundle: --tta, the model's classes, float16 storage, the PCA, float32 embeddings on the CPU
    ("bundle_tta_option_ignored", "python/dnnrl/bundle.py", "        cfg.tta = tta\n",
     "        pass\n", None, EXPORT_TESTS),
    ("bundle_of_other_classes_accepted", "python/dnnrl/bundle.py",
     "if data_names is not None and list(data_names) != list(class_names):",
     "if False:", None, EXPORT_TESTS),
    ("bundle_without_val_k_not_one", "python/dnnrl/bundle.py",
     '        final.k = 1\n        facts["k"] = 1\n',
     '        facts["k"] = final.k\n',
     "the classifier is built with k = 1 and fit without validation data leaves k alone",
     EXPORT_TESTS),
    ("bundle_stored_in_float32", "python/dnnrl/bundle.py", "dtype = torch.float16 if half else torch.float32",
     "dtype = torch.float32", None, EXPORT_TESTS),
    ("bundle_gallery_not_projected", "python/dnnrl/bundle.py", "        stored = (gal32 - mean) @ comps\n",
     "        stored = gal32 @ comps\n", None, EXPORT_TESTS),
    ("bundle_gallery_labels_int64", "python/dnnrl/bundle.py",
     '"gallery_labels": ygal.to(torch.uint8 if C <= 256 else torch.int64)',
     '"gallery_labels": ygal', None, EXPORT_TESTS),
    ("bundle_embeds_on_cpu_with_amp", "python/dnnrl/bundle.py", '    amp = cfg.amp if dev.type == "cuda" else "off"\n',
     '    amp = "bf16"\n', None, EXPORT_TESTS),
    # reading an image to predict: alpha on white, bit depths, EXIF rotation, empty files, downscaled detection
    ("alpha_composited_on_black", "python/dnnrl/faces.py", 'Image.new("RGBA", im.size, (255, 255, 255, 255))',
     'Image.new("RGBA", im.size, (0, 0, 0, 255))', None, PREDICT_TESTS),
    ("sixteen_bit_scaled_by_255", "python/dnnrl/faces.py",
     'top = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0',
     "top = 255.0", None, PREDICT_TESTS),
    ("float_array_not_scaled_to_255", "python/dnnrl/faces.py", "* (255.0 if a.max(initial=0) <= 1.0 else 1.0)",
     "* 1.0", None, PREDICT_TESTS),
    ("exif_rotation_ignored", "python/dnnrl/faces.py", "im = ImageOps.exif_transpose(im) or im",
     "im = im", None, PREDICT_TESTS),
    ("empty_file_message_lost", "python/dnnrl/faces.py", "                if os.path.getsize(source) == 0:\n",
     "                if False:\n", None, PREDICT_TESTS),
    ("bool_array_kept_0_1", "python/dnnrl/faces.py", "        a = a.astype(np.uint8) * 255\n",
     "        a = a.astype(np.uint8)\n", None, PREDICT_TESTS),
    ("detection_downscale_not_undone", "python/dnnrl/faces.py", "    if scale < 1.0:\n        boxes = boxes / scale\n",
     "    if False:\n        boxes = boxes / scale\n", None, PREDICT_TESTS),
]


def _run(cmd, cwd, log, env=None, timeout=None):
    with open(log, "w") as f:
        return subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode


def _first_failure(log):
    for line in open(log, errors="replace"):
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split()[1]
    return ""


BUILD = [sys.executable, "setup.py", "build_ext", "--inplace"]


def _needs_build(path):
    """C++ of the extension; the CUDA sources are not in its CPU-only build (FORCE_CPU=1): their
    tests build the emulator from the mutated sources themselves."""
    return path.startswith("csrc/") and not path.startswith("csrc/cuda/")


def run_mutant(mutant, tree, scratch, env, pytest, timeout):
    """Apply one mutant in ``tree``, build where it is C++, run its tests, restore the
    file, and rebuild a C++ one's original (before session 21 the restored source was
    not rebuilt, so every later mutant ran against the last C++ mutant's build and could
    be "killed" by it). Returns pytest's exit code, or None where the mutant does not build."""
    ident, path, text, repl = mutant[:4]
    own_tests = mutant[5:]
    target = os.path.join(tree, path)
    original = open(target).read()
    if original.count(text) != 1:
        raise SystemExit("%s: the text to mutate occurs %d times in %s (the table is out of date)"
                         % (ident, original.count(text), path))
    log = os.path.join(scratch, ident + ".log")
    try:
        open(target, "w").write(original.replace(text, repl))
        if _needs_build(path) and _run(BUILD, tree, log, env) != 0:
            return None
        return _run(pytest + (own_tests[0] if own_tests else TESTS), tree, log, env, timeout)
    finally:
        open(target, "w").write(original)
        if _needs_build(path) and _run(BUILD, tree, os.path.join(scratch, ident + "-restore.log"), env) != 0:
            raise SystemExit("%s: the restored tree no longer builds (see %s-restore.log)" % (ident, ident))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="ID", help="run these mutants only")
    ap.add_argument("--keep", action="store_true", help="keep the scratch worktree and logs")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mutant's test run")
    ap.add_argument("--property-tests", action="store_true",
                    help="let the hypothesis property tests kill mutants too (their kills vary by run)")
    args = ap.parse_args(argv)
    pytest = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
    if not args.property_tests:
        pytest += ["-m", "not hypothesis"]
    chosen = [m for m in MUTANTS if not args.only or m[0] in args.only]
    if args.only and len(chosen) != len(args.only):
        ap.error("--only: unknown mutant; known: %s" % ", ".join(m[0] for m in MUTANTS))

    scratch = tempfile.mkdtemp(prefix="dnnrl-mutants-")
    tree = os.path.join(scratch, "tree")
    subprocess.run(["git", "worktree", "add", "-q", "--detach", tree, "HEAD"], cwd=REPO, check=True)
    shared = os.path.join(os.path.dirname(REPO), "shared")
    if os.path.isdir(shared):  # the tests that read ../shared (FER-2013 faces) run in the worktree too
        os.symlink(shared, os.path.join(scratch, "shared"))
    env = dict(os.environ, FORCE_CPU="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"),
               PYTHONPATH=tree + os.pathsep + os.path.join(tree, "python"), DNNRL_REQUIRE_EXTENSION="1")
    survived = []
    try:
        # the unmutated tree first: it must build and pass, or no "killed" below means anything
        log = os.path.join(scratch, "baseline-build.log")
        t0 = time.time()
        suites = [TESTS] + [m[5] for m in chosen if len(m) > 5 and not m[4]]
        suites = [t for i, t in enumerate(suites) if t not in suites[:i]]
        if _run(BUILD, tree, log, env) != 0:
            raise SystemExit("the unmutated tree fails to build: see %s" % log)
        for i, suite in enumerate(suites):
            log = os.path.join(scratch, "baseline%d.log" % i)
            rc = _run(pytest + suite, tree, log, env, args.timeout)
            if rc != 0:
                # the scratch folder goes below unless --keep, so the message carries the log's end
                why = " (pytest's 5: the selection holds no test; the table is out of date)" if rc == 5 else ""
                tail = "".join(open(log, errors="replace").readlines()[-15:])
                raise SystemExit("the unmutated tree fails its tests: %s exited %d%s\n%s"
                                 % (" ".join(suite), rc, why, tail))
        print("%-36s passes  %5.0f s (build + %d test suites)" % ("baseline (HEAD)", time.time() - t0,
                                                                 len(suites)), flush=True)
        for ident, path, text, repl, equivalent, *own_tests in chosen:
            if equivalent:
                print("%-36s equivalent: %s" % (ident, equivalent), flush=True)
                continue
            t0 = time.time()
            rc = run_mutant((ident, path, text, repl, equivalent, *own_tests), tree, scratch, env, pytest,
                            args.timeout)
            log = os.path.join(scratch, ident + ".log")
            if rc is None:
                print("%-36s killed (does not build) %5.0f s" % (ident, time.time() - t0), flush=True)
                continue
            if rc == 0:
                survived.append(ident)
            print("%-36s %s %5.0f s %s" % (ident, "killed  " if rc else "SURVIVED", time.time() - t0,
                                           _first_failure(log)), flush=True)
    finally:
        if args.keep:
            print("kept", scratch)
        else:
            subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=REPO)
            shutil.rmtree(scratch, ignore_errors=True)
    print("%d run, %d survived%s" % (sum(1 for m in chosen if not m[4]), len(survived),
                                     (": " + ", ".join(survived)) if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
