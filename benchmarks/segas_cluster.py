"""Time of one SegAS re-clustering (faiss bottom-up k-means, niter 20, nredo 5 as HCSC) on
synthetic unit vectors, at the automatic prototype counts for each set size.

    python benchmarks/segas_cluster.py [--sizes 2600 130000] [--dim 128] [--repeats 3]

Only the k-means is timed: embedding the images is a forward pass over the set (see
train_step.py for the cost of a step). Medians of --repeats runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from sslmask.prototypes import hierarchical_kmeans, prototype_sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=int, default=[2600, 130_000])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import faiss

    print(
        f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, {args.dim}-d, median of {args.repeats}"
    )
    print(f"{'images':>10}  {'prototypes':<22}{'seconds':>10}")
    for n in args.sizes:
        x = np.random.default_rng(0).standard_normal((n, args.dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        sizes = prototype_sizes(None, n)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            hierarchical_kmeans(x, sizes)
            times.append(time.perf_counter() - t0)
        print(f"{n:>10}  {str(sizes):<22}{statistics.median(times):>10.2f}")


if __name__ == "__main__":
    main()
