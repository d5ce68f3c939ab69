"""ClaDec on digits, the paper's way: decoders fitted post hoc to a trained classifier, then the paper's protocol.

For a conv layer and the last hidden layer, and for alpha = 0 and alpha > 0, it prints
* test reconstruction loss (per-element MSE) of ClaDec and of the reference auto-encoder (RefAE);
* the frozen (explained) classifier's accuracy on the reconstructions;
* the paper's protocol: a fresh classifier of the same architecture trained on reconstructed training images and
  tested on reconstructed test images (and, for reference, on the original test images), averaged over seeds.

    python benchmarks/cladec_paper_table.py --epochs 20 --seeds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _digits import trained_digits_cnn

from lightning_xai import ClaDec
from lightning_xai.cladec.protocol import paper_protocol
from lightning_xai.posthoc import fit_explainers

QUIET = dict(logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier-epochs", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=20, help="post-hoc decoder epochs")
    parser.add_argument("--protocol-epochs", type=int, default=10, help="epochs of each fresh classifier")
    parser.add_argument("--seeds", type=int, default=3, help="fresh classifiers per cell (averaged)")
    parser.add_argument("--alphas", default="0,0.05,0.5", help="comma-separated alpha values")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    classifier, dm = trained_digits_cnn(args.classifier_epochs)

    rows = []
    for layer, label in (("features.7", "conv block 2 (32×2×2)"), (None, "last hidden (64)")):
        for alpha in (float(a) for a in args.alphas.split(",")):
            start = time.perf_counter()
            cladec = ClaDec(layer=layer, alpha=alpha, every_n_steps=1, probe_size=0)
            fit_explainers(classifier, dm, [cladec], epochs=args.epochs, accelerator="cpu", **QUIET)
            runs = [
                paper_protocol(cladec, classifier, dm.train_dataloader(), dm.test_dataloader(), args.protocol_epochs, s)
                for s in range(args.seeds)
            ]
            mean = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
            rows.append((label, alpha, mean, time.perf_counter() - start))

    print(f"digits test set ({len(dm.test_dataset)} images); explained classifier trained {args.classifier_epochs} "
          f"epochs, test accuracy {rows[0][2]['orig/frozen_acc']:.4f}; decoders fitted post hoc for {args.epochs} "
          f"epochs; fresh classifiers: {args.seeds} seeds × {args.protocol_epochs} epochs")
    print("| layer | alpha | rec ClaDec | rec RefAE | frozen acc ClaDec | frozen acc RefAE | fresh acc ClaDec | "
          "fresh acc RefAE | fresh acc orig | fresh ClaDec→orig | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, alpha, m, seconds in rows:
        print(f"| {label} | {alpha:g} | {m['cladec/rec_loss']:.4f} | {m['refae/rec_loss']:.4f} | "
              f"{m['cladec/frozen_acc']:.4f} | {m['refae/frozen_acc']:.4f} | {m['cladec/fresh_acc']:.4f} | "
              f"{m['refae/fresh_acc']:.4f} | {m['orig/fresh_acc']:.4f} | {m['cladec/fresh_acc_on_orig']:.4f} | "
              f"{seconds:.0f} |")


if __name__ == "__main__":
    main()
