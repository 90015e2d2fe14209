"""The ``sculpt`` command: run [--config job.yaml] | status OUT | report OUT | export OUT DEST | preview OUT [DEST] |
review sample|import|report | size --gpus N | samples DIR | models tiny DIR."""

from __future__ import annotations

import argparse
import sys

from sculpt.io.storage import S3Options


def status(out: str, s3: S3Options, by_shard: bool = False) -> str:
    """Shards done/total, chunks, images and errors of an output path; ``by_shard``: a line per shard begun."""
    from sculpt.outputs import report
    from sculpt.outputs.store import OutputStore, shard_progress, shards_line

    store = OutputStore(out, s3)
    job = store.job()
    if job is None:
        return f"{out}: no sculpt output here"
    total, markers = report.job_stats(store)
    lines = [
        f"output   {out} (config {job['fingerprint']})",
        f"shards   {shards_line(job, markers)}",
        f"images   {report.images_summary(total)}",
        f"objects  {total['objects']} ({total['kept']} kept)",
    ]
    if total["errors_by_stage"]:
        lines.append("errors   " + ", ".join(f"{stage}: {n}" for stage, n in sorted(total["errors_by_stage"].items())))
    if by_shard:
        lines += [f"  {shard}  {'done' if p['done'] else 'part-way'}: {p['chunks']} chunk(s), {p['images']} images"
                  for shard, p in shard_progress(markers).items()]
    return "\n".join(lines)


def report(out: str, s3: S3Options, plots: str | None) -> int:
    from sculpt.outputs import report as job_report
    from sculpt.outputs.store import OutputStore
    from sculpt.io.storage import is_s3, join

    store = OutputStore(out, s3)
    job = store.job()
    if job is None:
        print(f"{out}: no sculpt output here")
        return 1
    total, markers = job_report.job_stats(store)
    print(job_report.render(out, job, total, markers))
    directory = plots or ("sculpt-report" if is_s3(out) else join(out, "_report"))
    paths = job_report.plot(total, directory)
    for path in paths:
        print(f"plot: {path}")
    with open(join(directory, "index.html"), "w", encoding="utf-8") as f:
        f.write(job_report.page(out, job, total, markers, paths))
    print(f"page: {join(directory, 'index.html')} (the figures above and the plots)")
    return 0


def preview(args) -> int:
    from sculpt.outputs import export
    from sculpt.outputs import preview as gallery
    from sculpt.io.storage import is_s3, join

    dest = args.dest or ("sculpt-preview" if is_s3(args.output) else join(args.output, "_preview"))
    try:
        written = gallery.write_preview(args.output, dest, S3Options(endpoint=args.s3_endpoint), args.per_page,
                                        args.limit, args.max_side, args.shards)
    except export.ExportError as exc:
        print(f"sculpt preview: {exc}", file=sys.stderr)
        return 1
    print(f"preview: {written['cards']} cards on {written['pages']} page(s); open {written['index']}")
    if args.screenshot:
        if is_s3(dest):
            print("sculpt preview: --screenshot needs a local DEST", file=sys.stderr)
            return 1
        width, _, height = args.screenshot_size.partition("x")
        try:
            # 256 colours: a README-sized file; the pixels of tests/test_preview.py come from an unreduced one
            path = gallery.screenshot(written["index"], args.screenshot, (int(width), int(height)), colours=256)
        except gallery.NoBrowser as exc:
            print(f"sculpt preview: {exc}", file=sys.stderr)
            return 1
        print(f"screenshot: {path}")
    return 0


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML job config (see workflows/annotate.yaml)")
    parser.add_argument("--input", action="append",
                        help="SA-1B or WebDataset tars, a folder of images or Parquet files: a file, directory, glob "
                             "or s3:// prefix (repeatable; input.kind)")
    parser.add_argument("--demo", action="store_true",
                        help="the demo's tiny offline models on the CPU, on --input when given (a folder of images)")
    parser.add_argument("--output", help="output directory or s3:// prefix")
    parser.add_argument("--overwrite", action="store_true", help="delete output written with another config and start over")
    parser.add_argument("--redo-errors", action="store_true",
                        help="process again the error rows of committed units (same config), keeping every good row")
    parser.add_argument("--s3-endpoint", help="S3-compatible endpoint URL, e.g. http://127.0.0.1:9000")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. input.readers=4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sculpt")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("run", help="annotate shards (the job; no --config and no --input: the demo on the CPU)")
    add_run_arguments(p)
    p = commands.add_parser("status", help="shards done/total, chunks, images, errors of an output path")
    p.add_argument("output")
    p.add_argument("--shards", action="store_true", help="also a line per shard begun: done or part-way, its chunks")
    p.add_argument("--s3-endpoint")
    p = commands.add_parser("report", help="the job's statistics (text), plots (PNG) and one HTML page of both")
    p.add_argument("output")
    p.add_argument("--plots", help="directory for the PNG plots (default: OUT/_report, or ./sculpt-report for s3://)")
    p.add_argument("--s3-endpoint")
    add_export_command(commands)
    add_preview_command(commands)
    add_review_command(commands)
    p = commands.add_parser("size", help="actors and GPU shares per stage that balance a job on N GPUs")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--cost", action="append", default=[], metavar="STAGE=MS",
                   help="GPU ms per image of a stage (vlm, ground, mask, verify), e.g. from benchmarks/gpu_stages.py")
    p.add_argument("--tensor-parallel", type=int, default=1)
    p.add_argument("--reasoning", type=int, default=None, metavar="N",
                   help="reasoning references per image (stages.refer.params.reasoning; default the stage's)")
    p.add_argument("--chat-turns", type=int, default=None, metavar="N",
                   help="grounded chat turns per image (stages.chat.params.turns; default the stage's)")
    p = commands.add_parser("samples", help="write small SA-1B-format shards (or --kind) from scikit-image photographs")
    p.add_argument("directory")
    p.add_argument("--kind", choices=["sa1b", "images", "webdataset", "parquet"], default="sa1b",
                   help="images: a folder of JPEG/PNG/WebP files; webdataset: tars; parquet: Hugging Face's layout")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--images", type=int, default=6, help="images per shard")
    p.add_argument("--scale", type=float, default=1.0, help="enlarge the photographs by this factor")
    p = commands.add_parser("models", help="offline model checkpoints")
    p.add_argument("action", choices=["tiny"], help="tiny: write seeded tiny checkpoints of every model (see sculpt.testing.kit)")
    p.add_argument("directory")
    p.add_argument("--seed", type=int, default=0)
    return parser


def add_export_command(commands) -> None:
    p = commands.add_parser("export", help="the output's expression-mask pairs as GSEval jsonl, COCO JSON, HF Parquet "
                            "or Label Studio tasks, or as training data: GLaMM GCG, RefCOCO (refer API), LLaVA")
    p.add_argument("output")
    p.add_argument("dest", help="a .jsonl (gseval) or .json (coco, labelstudio, gcg, llava) file, or a directory: "
                   "of Parquet files (hf), of instances.json + refs(sculpt).p (refcoco; name it refcoco for REFER)")
    p.add_argument("--format", required=True,
                   choices=["gseval", "coco", "hf", "labelstudio", "gcg", "refcoco", "llava"],
                   help="gseval: GroundingSuite jsonl (class_id from the category: 1 stuff, 2 part, 3 multi, 4 single); "
                   "coco: instances + RefCOCO-style refs; hf: Parquet pairs for datasets.load_dataset; labelstudio: "
                   "tasks JSON with brush masks, expressions and boxes as predictions; gcg: GLaMM grounded captions; "
                   "refcoco: instances.json + refs(sculpt).p, split by image; llava: conversations with [SEG] and RLE "
                   "masks")
    p.add_argument("--all", action="store_true", help="every pair with its iou and kept, not only kept ones")
    p.add_argument("--images", metavar="DIR", help="also write each exported image, upright, to DIR/<shard>/<key>.jpg "
                   "(read from the input shards) and point the records at it")
    p.add_argument("--image-root", metavar="PREFIX", help="name images PREFIX/<shard>/<key>.jpg in the records "
                   "(default: the --images DIR, else <shard>/<key>.jpg)")
    p.add_argument("--shards", action="append", metavar="PATH",
                   help="where the input tars are now, if not where the job read them (repeatable; for --images)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DEST")
    p.add_argument("--seed", type=int, default=0, help="refcoco: the seed of the split by image (default 0)")
    p.add_argument("--split", default="0.8,0.1,0.1", metavar="TRAIN,VAL,TEST",
                   help="refcoco: fractions of the images in train, val, test (default 0.8,0.1,0.1)")
    p.add_argument("--s3-endpoint")


def add_preview_command(commands) -> None:
    p = commands.add_parser("preview", help="a static HTML gallery of the output: images, masks, boxes, expressions")
    p.add_argument("output")
    p.add_argument("dest", nargs="?", help="directory for the pages (default: OUT/_preview, or ./sculpt-preview for s3://)")
    p.add_argument("--per-page", type=int, default=48, help="cards per page (default 48)")
    p.add_argument("--limit", type=int, default=500, help="images at most, in output order (default 500; 0: all)")
    p.add_argument("--max-side", type=int, default=512, help="longest side of a card's image in pixels (default 512)")
    p.add_argument("--shards", action="append", metavar="PATH",
                   help="where the input tars are now, if not where the job read them (repeatable)")
    p.add_argument("--screenshot", metavar="PNG", help="also draw the first page with headless Chromium into PNG")
    p.add_argument("--screenshot-size", default="1280x900", metavar="WxH")
    p.add_argument("--s3-endpoint")


def add_review_command(commands) -> None:
    review = commands.add_parser("review", help="precision measured with people: a Label Studio sample, its verdicts, "
                                 "precision and recall with intervals")
    actions = review.add_subparsers(dest="action", required=True)
    p = actions.add_parser("sample", help="a stratified sample of pairs (kept and rejected, by check, category and "
                           "IoU band) as Label Studio tasks, one per pair, with their images, in DEST")
    p.add_argument("output")
    p.add_argument("dest", help="a local folder: tasks.json, labeling-config.xml, images/ (Label Studio's document root)")
    p.add_argument("--n", type=int, default=300, help="pairs in the sample (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", action="append", metavar="PATH",
                   help="where the input tars are now, if not where the job read them (repeatable)")
    p.add_argument("--image-root", metavar="PREFIX", help="name images PREFIX/<shard>/<key>.jpg in the tasks "
                   "(default: /data/local-files/?d=images, DEST being LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT)")
    p.add_argument("--overwrite", action="store_true", help="write into a DEST that is not empty")
    p = actions.add_parser("import", help="a Label Studio JSON export of the sample's tasks into OUT/.sculpt/review/")
    p.add_argument("output")
    p.add_argument("export", help="the JSON (or JSON-min) file Label Studio exported")
    p = actions.add_parser("report", help="precision of kept pairs, recall of good pairs, per category and check, "
                           "and the IoU threshold for a target precision")
    p.add_argument("output")
    p.add_argument("--target", type=float, default=0.9, help="the precision to reach (default 0.9)")
    for p in actions.choices.values():
        p.add_argument("--s3-endpoint")


def review(args, s3: S3Options) -> int:
    from sculpt.outputs import review

    try:
        if args.action == "sample":
            counts = review.sample(args.output, args.dest, args.n, args.seed, s3, args.shards,
                                   args.image_root or review.IMAGE_ROOT, args.overwrite)
            print(f"sampled {counts['pairs']} of {counts['population']} pairs in {counts['strata']} strata "
                  f"(seed {args.seed}) to {args.dest}/tasks.json; {counts.get('image_files', 0)} images in "
                  f"{args.dest}/{review.IMAGES}\nlabeling config (also in {args.dest}/labeling-config.xml):\n"
                  + review.LABELING_CONFIG)
        elif args.action == "import":
            counts = review.import_verdicts(args.output, args.export, s3)
            print(f"imported {counts['imported']} verdicts ({counts['replaced']} replacing earlier ones); "
                  f"{counts['verdicts']} in {counts['path']}")
        else:
            print(review.report(args.output, args.target, s3))
    except review.ExportError as exc:
        print(f"sculpt review {args.action}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        from sculpt.engine import job

        return job.main(args)
    s3 = S3Options(endpoint=getattr(args, "s3_endpoint", None))
    if args.command == "status":
        print(status(args.output, s3, by_shard=args.shards))
    elif args.command == "report":
        return report(args.output, s3, args.plots)
    elif args.command == "export":
        return export(args, s3)
    elif args.command == "preview":
        return preview(args)
    elif args.command == "review":
        return review(args, s3)
    elif args.command == "size":
        size(args, parser)
    elif args.command == "samples":
        from sculpt.testing.samples import make_sample_inputs, make_sample_shards

        if args.kind != "sa1b":
            print(make_sample_inputs(args.directory, args.kind, args.shards * args.images, args.images))
            return 0
        for path in make_sample_shards(args.directory, args.shards, args.images, args.scale):
            print(path)
    elif args.command == "models":
        from sculpt.testing.kit import write_tiny_models

        for key, path in write_tiny_models(args.directory, args.seed).items():
            print(f"{key}: {path}")
        print(f"use them with: --config {args.directory}/models.yaml (or --set models.<key>=<path>)")
    return 0


def export(args, s3: S3Options) -> int:
    from sculpt.outputs import export

    try:
        counts = export.export(args.output, args.dest, args.format, s3, keep_all=args.all, overwrite=args.overwrite,
                               images=args.images, image_root=args.image_root, shards=args.shards, seed=args.seed,
                               split=args.split)
    except export.ExportError as exc:
        print(f"sculpt export: {exc}", file=sys.stderr)
        return 1
    which = "pairs" if args.all else "kept pairs"
    print(f"exported {counts['pairs']} {which} of {counts['images']} images to {args.dest} ({args.format})"
          + (f"; {counts['image_files']} image files in {args.images}" if args.images else "")
          + (f"; {counts['records']} records" if "records" in counts else "")
          + ("; split " + ", ".join(f"{counts[s]} {s}" for s in ("train", "val", "test")) if "train" in counts else ""))
    return 0


def size(args, parser: argparse.ArgumentParser) -> None:
    from sculpt.engine import sizing

    costs = {}
    for item in args.cost:
        stage, sep, ms = item.partition("=")
        if not sep or stage not in sizing.DEFAULT_COSTS_MS or not ms.replace(".", "", 1).isdigit():
            parser.error(f"--cost {item!r}: expected STAGE=MS with STAGE one of {', '.join(sizing.DEFAULT_COSTS_MS)}")
        costs[stage] = float(ms)
    try:
        counts = {key: value for key, value in (("reasoning_count", args.reasoning), ("chat_turns", args.chat_turns))
                  if value is not None}
        if any(value < 0 for value in counts.values()):
            parser.error("--reasoning and --chat-turns count per image: 0 or more")
        plan = sizing.propose(args.gpus, costs, tensor_parallel=args.tensor_parallel, **counts)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"# sculpt size --gpus {args.gpus}: {sizing.describe(plan)}")
    print(sizing.job_sections(plan))

if __name__ == "__main__":
    sys.exit(main())
