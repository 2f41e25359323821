"""`dmil estimate`: how a dataset's modalities interact about its labels (redundancy, uniqueness, synergy, in bits).
The work, and the three files it writes, are `dmil_hf.interactions.dataset_estimate.estimate_dataset`'s."""

from __future__ import annotations


def add_parser(subparsers):
    from ..run_settings import add_dataset_arg_option

    p = subparsers.add_parser("estimate", help="estimate redundancy / uniqueness / synergy of a dataset (bits)")
    p.add_argument("--dataset", required=True, help="built-in name (synthetic, digits) or a save_to_disk folder")
    p.add_argument("--output", required=True,
                   help="JSON file to write; FILE.per_sample.jsonl and FILE.per_sample.png go beside it")
    p.add_argument("--split", default="test",
                   help="which split to estimate on: train, validation, test, or all (the three concatenated)")
    p.add_argument("--model", default=None,
                   help="folder of a trained model: use its projected tower embeddings as the modality "
                        "representations, and add its per-sample interaction weights")
    p.add_argument("--modalities", nargs="+", default=None, metavar="M",
                   help="modalities to use (default: all the dataset's); at least two")
    p.add_argument("--n-clusters", type=int, default=10,
                   help="k-means clusters per modality (dataset-level estimate); keep N well above "
                        "n_clusters^2 x classes (a warning says when it is not)")
    p.add_argument("--seed", type=int, default=0, help="k-means, reductions, folds and classifiers")
    p.add_argument("--dims", type=int, default=32,
                   help="width of the default text / image / audio representations (TF-IDF SVD / PCA)")
    p.add_argument("--per-sample-classifier", default="mlp", choices=["mlp", "logistic"],
                   help="unimodal classifiers of the per-sample estimate (the joint one is always an MLP); logistic "
                        "is several times faster but, when a modality's signal is non-linear, credits what the "
                        "unimodal models miss to synergy")
    p.add_argument("--folds", type=int, default=5, help="cross-fitting folds of the per-sample estimate")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load pickle (.bin) weights; only if you trust them")
    add_dataset_arg_option(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..interactions.dataset_estimate import estimate_dataset
    from ..run_settings import parse_key_values

    result = estimate_dataset(
        args.dataset, args.output, split=args.split, model=args.model, modalities=args.modalities,
        n_clusters=args.n_clusters, seed=args.seed, dims=args.dims, per_sample_classifier=args.per_sample_classifier,
        folds=args.folds, allow_pickle=args.allow_pickle, dataset_kwargs=parse_key_values(args.dataset_arg))
    print(result["table"])
    print(f"wrote {', '.join(str(path) for path in result['files'])}")
    return 0
