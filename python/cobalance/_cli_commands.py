"""The command line's subcommands: what ``scan``, ``fit``, ``report``, ``write`` and ``demo`` do.

:mod:`cobalance.cli` parses the options and calls ``cmd_<name>(args, console)``;
each composes the library's stages (:func:`cobalance.labels.read_labels`,
:class:`~cobalance.folders.MaskFolder`, :class:`~cobalance.PatternTable`,
:class:`~cobalance.Balancer`, :class:`~cobalance.Plan`, :class:`~cobalance.Report`)
and returns the exit code. What each file came from is written into it
(``provenance``); see :mod:`cobalance._cli_inputs` for how it is read back.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from . import _side_records as records
from ._atomic import atomic_write_text
from ._cli_console import EXIT_OK, Console, UsageError, one_line, require_file
from ._cli_inputs import (load_plan, load_table, parse_target, plan_origin, table_of_plan, table_origin,
                          target_path)
from ._version import __version__
from .patterns import PatternTable

__all__ = ["cmd_scan", "cmd_fit", "cmd_report", "cmd_write", "cmd_demo"]


def _report_outputs(args) -> List[Tuple[str, Any]]:
    return [("--markdown", getattr(args, "markdown", None)), ("--report-json", getattr(args, "report_json", None)),
            ("--png", getattr(args, "png", None))]


def _parse_names(text: Optional[str]) -> Optional[List[str]]:
    if text is None:
        return None
    names = [s.strip() for s in text.split(",")]
    if any(not s for s in names):
        raise UsageError(f"--class-names must be a comma-separated list of non-empty names, got {text!r}")
    return names


# -- scan -------------------------------------------------------------------------------


def _presence_rows(table: PatternTable, pixel_share=None) -> List[dict]:
    counts = table.class_counts()
    presence = table.class_presence()
    rows = []
    for i, name in enumerate(table.class_names):
        row = {"name": name, "samples": int(counts[i]), "presence": float(presence[i])}
        if pixel_share is not None:
            row["pixel_share"] = float(pixel_share[i])
        rows.append(row)
    return rows


def _presence_text(table: PatternTable, pixel_share=None, unit: str = "samples") -> str:
    rows = _presence_rows(table, pixel_share)
    width = max([5] + [len(r["name"]) for r in rows])
    head = f"{'class':<{width}}  {unit:>9}  presence"
    if pixel_share is not None:
        head += "  pixel share"
    lines = [f"{table.n_samples} {unit}, {table.n_classes} classes, {table.n_patterns} patterns", "", head]
    for r in rows:
        line = f"{r['name']:<{width}}  {r['samples']:>9d}  {r['presence']:8.2%}"
        if pixel_share is not None:
            line += f"  {r['pixel_share']:11.3%}"
        lines.append(line)
    return "\n".join(lines)


def _mask_folder(path: Path, args):
    """A MaskFolder from the command line's masks options."""
    from .folders import MaskFolder

    return MaskFolder(path, **_mask_folder_options(args))


def _mask_folder_options(args) -> dict:
    options = {}
    if getattr(args, "layout", None):
        options["layout"] = args.layout
    names = _parse_names(getattr(args, "class_names", None))
    if names is not None:
        options["class_names"] = names
    for key in ("tile", "stride", "ignore_index", "min_pixels", "image_dir", "mask_dir", "valid_dir", "stem_key",
                "min_valid"):
        value = getattr(args, key, None)
        if value is not None:
            options[key] = value
    return options


def _mask_folder_record(folder) -> dict:
    """What rebuilds the same samples in the same order (for ``write``)."""
    return {"layout": folder.layout, "class_names": list(folder.class_names),
            "tile": None if folder.tile is None else list(folder.tile),
            "stride": None if folder.stride is None else list(folder.stride),
            "ignore_index": None if folder.ignore_index is None else list(folder.ignore_index),
            "min_pixels": np.asarray(folder.min_pixels).tolist(),
            "image_dir": folder.image_dir, "mask_dir": folder.mask_dir, "valid_dir": folder.valid_dir,
            "stem_key": folder.stem_key if isinstance(folder.stem_key, str) else None,
            "min_valid": folder.min_valid}


#: Library words in the label reader's messages, and the options that set them.
_LABEL_OPTION_WORDS = (("class_names has", "--class-names has"), ("pass format=", "pass --format"),
                       ("columns applies to", "--columns applies to"), ("name .npy/.npz columns with class_names",
                                                                        "name .npy/.npz columns with --class-names"))


def _table_from_label_file(path: Path, fmt: str, args, console: Console) -> PatternTable:
    """:func:`cobalance.labels.read_labels` with the command line's options and progress bar."""
    from .labels import read_labels

    try:
        return read_labels(path, format=fmt, columns=_parse_names(args.columns), delimiter=args.delimiter,
                           class_names=_parse_names(args.class_names),
                           progress=lambda chunks, total: console.progress(chunks, total=total, desc="scan",
                                                                           unit="chunk"))
    except ValueError as exc:
        text = str(exc)
        for word, option in _LABEL_OPTION_WORDS:
            text = text.replace(word, option)
        raise UsageError(text) from None


def _input_format(path: Path, given: Optional[str]) -> str:
    from .labels import label_format

    if given == "masks" or (given is None and path.is_dir()):
        return "masks"
    try:
        return label_format(path, given)
    except ValueError as exc:
        raise UsageError(str(exc).replace("pass format=", "pass --format")) from None


def cmd_scan(args, console: Console) -> int:
    path = Path(args.input)
    if not path.exists():
        raise UsageError(f"input {args.input!r} does not exist")
    fmt = _input_format(path, args.format)
    if fmt != "masks" and path.is_dir():
        raise UsageError(f"input {args.input!r} is a folder; --format {fmt} expects a file")
    if fmt == "masks" and not path.is_dir():
        raise UsageError(f"--format masks expects a folder, got the file {args.input!r}")
    if args.output and Path(args.output).suffix != ".npz":
        raise UsageError(f"--output must end in .npz (a pattern-table file), got {args.output!r}")
    if args.output:
        records.refuse_clobbering(
            # the record name is refused too: earlier versions would read a file there as the table's record
            [("--output", args.output), ("the name of its scan record", records.record_path(args.output, "scan"))],
            [("the input", path)] if path.is_file() else [])
    pixel_share = None
    if fmt == "masks":
        if args.columns or args.delimiter:
            raise UsageError("--columns and --delimiter apply to label files, not masks folders")
        folder = _mask_folder(path, args)
        scan = folder.scan(progress=lambda masks: console.progress(masks, total=folder.n_images, desc="scan",
                                                                   unit="image"))
        table = scan.to_table(folder.class_names)
        table.provenance = _masks_provenance(path, folder)
        pixel_share = scan.pixel_share()
        unit = "tiles" if folder.tile is not None else "images"
    else:
        for flag in ("tile", "stride", "ignore_index", "min_pixels", "layout", "image_dir", "mask_dir", "valid_dir",
                     "stem_key", "min_valid"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag.replace('_', '-')} applies to masks folders only, not {fmt} files")
        table = _table_from_label_file(path, fmt, args, console)
        unit = "samples"
    doc = {"command": "scan", "input": str(path), "format": fmt, "output": None,
           "n_samples": table.n_samples, "n_classes": table.n_classes, "n_patterns": table.n_patterns,
           "classes": _presence_rows(table, pixel_share)}
    if args.output:
        table.save(args.output)
        doc["output"] = str(args.output)
    console.print(_presence_text(table, pixel_share, unit))
    if args.output:
        console.print(f"\nwrote {args.output}")
    console.emit_json(doc)
    return EXIT_OK


# -- fit ----------------------------------------------------------------------------------


def _balancer_options(args) -> dict:
    options = {"objective": args.objective, "regularizer": args.regularizer, "gamma": args.gamma,
               "solver": args.solver, "lr": args.lr, "max_iter": args.max_iter, "tol": args.tol,
               "init": args.init, "max_copies": args.max_copies, "budget": args.budget,
               "allow_undersampling": args.allow_undersampling, "n_samples_out": args.n_samples_out,
               "min_count": args.min_count, "max_count": args.max_count,
               "min_effective_size": args.min_effective_size, "random_state": args.seed}
    return options


def _fit(table: PatternTable, target_spec, args, console: Console):
    """Fit a Balancer with the command line's options; warnings become notes on stderr.

    Returns ``(balancer, options)``: the options as recorded (class weights by name).
    """
    import warnings

    from .balancer import Balancer

    options = _balancer_options(args)
    weights = _parse_class_weights(args.class_weights, table)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        balancer = Balancer(target=target_spec, class_weights=weights, **options).fit(table)
    for w in caught:
        console.note(f"warning: {one_line(w.message)}")
    if weights is not None:
        options["class_weights"] = dict(zip(table.class_names, weights.tolist()))
    return balancer, options


def _write_report_files(report, args, console: Console, written: dict) -> None:
    if getattr(args, "markdown", None):
        atomic_write_text(args.markdown, report.to_markdown())
        written["markdown"] = str(args.markdown)
    if getattr(args, "report_json", None):
        atomic_write_text(args.report_json, json.dumps(report.to_dict(), indent=2) + "\n")
        written["report_json"] = str(args.report_json)
    if getattr(args, "png", None):
        report.save_png(args.png)
        written["png"] = str(args.png)


def _require_png_support(args) -> None:
    """Fail before the work, not after it, when a chart is asked for without matplotlib."""
    if getattr(args, "png", None):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ImportError("--png needs matplotlib: pip install 'cobalance[plot]'") from None


def _masks_provenance(source: Path, folder) -> dict:
    """A scanned masks folder's table provenance: what rebuilds the same samples in the same order."""
    return {"cobalance": __version__, "source": str(Path(source).resolve()), "source_format": "masks",
            "mask_folder": _mask_folder_record(folder)}


def _save_plan(plan, out: Path, table: PatternTable, table_path: Path, target_spec, target, options: dict,
               report) -> dict:
    """Save the plan with its provenance: the table (path, relative path, SHA-256), target, options, report."""
    plan.provenance = {
        "cobalance": __version__,
        "table": {"path": str(table_path.resolve()),
                  "relative_path": os.path.relpath(table_path.resolve(), out.resolve().parent),
                  "sha256": records.file_sha256(table_path), "n_samples": table.n_samples,
                  "n_patterns": table.n_patterns},
        "class_names": table.class_names,
        "target_spec": target_spec,
        "target": [float(v) for v in target],
        "balancer": options,
        "report": report.to_dict(),
    }
    plan.save(out)
    return plan.provenance


def _plan_path(text: str) -> Path:
    p = Path(text)
    if p.suffix not in (".npz", ".json"):
        raise UsageError(f"--output must end in .npz or .json (a plan file), got {text!r}")
    return p


def cmd_fit(args, console: Console) -> int:
    out = _plan_path(args.output)
    _require_png_support(args)
    table_path = Path(args.table)
    records.refuse_clobbering(
        # the record name is refused too: earlier versions would read a file there as the plan's record
        [("--output", out), ("the name of its fit record", records.record_path(out, "fit")), *_report_outputs(args)],
        [("the table", table_path), *records.records_of(table_path, "scan", "the table's scan record"),
         ("the target file", target_path(args.target))])
    table = load_table(table_path)
    target_spec, target = parse_target(args.target, table)
    balancer, options = _fit(table, target_spec, args, console)
    plan, report = balancer.plan_, balancer.report_
    provenance = _save_plan(plan, out, table, table_path, target_spec, target, options, report)
    written = {"plan": str(out)}
    _write_report_files(report, args, console, written)
    console.print(report.to_markdown().rstrip("\n"))
    console.print(f"\nwrote {', '.join(written.values())}")
    console.emit_json({"command": "fit", "table": str(table_path), "outputs": written,
                       "target": provenance["target"], "balancer": options, "report": report.to_dict()})
    return EXIT_OK


def cmd_report(args, console: Console) -> int:
    from .report import Report

    plan_path = require_file(args.plan, "plan")
    _require_png_support(args)
    plan = load_plan(plan_path)
    # With both --table and --target the plan's origin is not needed (nor checked).
    origin = None if (args.table and args.target) else plan_origin(plan_path, plan, required=True,
                                                                   hint="pass --table and --target")
    table, table_path = table_of_plan(plan_path, origin, args.table)
    records.refuse_clobbering(_report_outputs(args), [
        ("the plan", plan_path), *records.records_of(plan_path, "fit", "the plan's fit record"),
        ("the table", table_path), *records.records_of(table_path, "scan", "the table's scan record"),
        ("the target file", target_path(args.target))])
    if plan.n_samples != table.n_samples:
        raise UsageError(f"the plan has {plan.n_samples} samples but the table {table_path} has {table.n_samples}")
    if args.target:
        _, target = parse_target(args.target, table)
    else:
        target = np.asarray(origin["target"], dtype=np.float64)
        if target.shape != (table.n_classes,):
            raise UsageError(f"{origin['_where']}: the target has {target.size} classes, the table {table_path} "
                             f"{table.n_classes}")
    extra = dict(origin["report"].get("extra", {})) if origin and not args.target else None
    report = Report.from_plan(table, plan, target, extra=extra)
    written = {}
    _write_report_files(report, args, console, written)
    console.print(report.to_markdown().rstrip("\n"))
    if written:
        console.print(f"\nwrote {', '.join(written.values())}")
    console.emit_json({"command": "report", "plan": str(plan_path), "table": str(table_path),
                       "outputs": written, "report": report.to_dict()})
    return EXIT_OK


# -- demo -------------------------------------------------------------------------------


def cmd_demo(args, console: Console) -> int:
    from .folders import MaskFolder, sample_path

    root = sample_path()
    if args.out and (records.within(args.out, root) or records.within(root, args.out)):
        raise UsageError(f"--out {args.out!r} overlaps the shipped sample {str(root)!r} it reads; "
                         "choose a folder outside it")
    folder = MaskFolder(root, tile=args.tile, stride=args.stride, min_pixels=args.min_pixels)
    whole = MaskFolder(root)
    scan = folder.scan()
    table = scan.to_table(folder.class_names)
    images = whole.scan().to_table(whole.class_names)
    tile_text = f"{folder.tile[0]}x{folder.tile[1]}"
    console.print(f"IDRiD sample: {whole.n_images} fundus images ({root})")
    pixels = "pixel" if args.min_pixels == 1 else "pixels"
    console.print(f"tiles of {tile_text} pixels, a class present from {args.min_pixels} {pixels} on\n")
    names = table.class_names
    width = max(5, *(len(n) for n in names))
    console.print(f"{'class':<{width}}  images %  tiles %  pixel share %")
    img_presence, tile_presence, share = images.class_presence(), table.class_presence(), scan.pixel_share()
    for i, n in enumerate(names):
        console.print(f"{n:<{width}}  {100 * img_presence[i]:8.1f}  {100 * tile_presence[i]:7.1f}  "
                      f"{100 * share[i]:13.3f}")
    console.print(f"\n{table.n_samples} tiles, {table.n_patterns} class-presence patterns")

    target_spec, target = parse_target(args.target, table)
    balancer, options = _fit(table, target_spec, args, console)
    plan, report = balancer.plan_, balancer.report_
    console.print(f"\nbalanced towards target {args.target!r}:\n")
    console.print(report.to_markdown().rstrip("\n"))

    written = {}
    skipped = None
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        table_path, plan_path = out / "table.npz", out / "plan.npz"
        table.provenance = _masks_provenance(root, folder)
        table.save(table_path)
        _save_plan(plan, plan_path, table, table_path, target_spec, target, options, report)
        written.update(table=str(table_path), plan=str(plan_path))
        atomic_write_text(out / "report.md", report.to_markdown())
        atomic_write_text(out / "report.json", json.dumps(report.to_dict(), indent=2) + "\n")
        written.update(markdown=str(out / "report.md"), report_json=str(out / "report.json"))
        try:
            report.save_png(out / "report.png")
            written["png"] = str(out / "report.png")
        except ImportError:
            console.note("matplotlib is not installed: no report.png (pip install 'cobalance[plot]')")
        skipped = _demo_write_dataset(folder, plan, out / "balanced", args, console, written)
        console.print(f"\nwrote {len(written)} outputs under {out}")
    console.emit_json({
        "command": "demo", "source": str(root), "n_images": whole.n_images, "n_tiles": table.n_samples,
        "n_patterns": table.n_patterns, "tile": list(folder.tile), "min_pixels": args.min_pixels,
        "classes": [{"name": n, "image_presence": float(img_presence[i]), "tile_presence": float(tile_presence[i]),
                     "pixel_share": float(share[i])} for i, n in enumerate(names)],
        "report": report.to_dict(), "outputs": written, "skipped": skipped})
    return EXIT_OK


def _demo_write_dataset(folder, plan, out_dir: Path, args, console: Console, written: dict):
    """The balanced dataset folder; returns why it was skipped, or None."""
    try:
        import torch  # noqa: F401  (the writer's augmentations run on torch)
        from .segmentation.writer import write_balanced
    except ImportError as exc:
        why = f"torch is not installed ({one_line(exc)}): skipped writing the balanced dataset"
        console.note(why + " (pip install 'cobalance[torch]')")
        return why
    _write_dataset(write_balanced, folder, plan, out_dir, args, console)
    written["balanced"] = str(out_dir)
    return None


# -- write ------------------------------------------------------------------------------


def _table_of_plan(plan_path: Path, plan, table_override) -> Tuple[Optional[Path], Optional[dict]]:
    """The plan's table (``--table``, else through the plan's origin) and where the table came from.

    The table's origin says how the samples were cut. Returns ``(None, None)`` when
    there is neither ``--table`` nor an origin of the plan; a given or recorded
    table must exist, be a table and hold the plan's number of samples.
    """
    if table_override:
        table_path = require_file(table_override, "table")
        table = load_table(table_path)
    elif (origin := plan_origin(plan_path, plan, required=False)) is not None:
        table, table_path = table_of_plan(plan_path, origin, None)
    else:
        return None, None
    if table.n_samples != plan.n_samples:
        raise UsageError(f"the plan has {plan.n_samples} samples but the table {table_path} has {table.n_samples}")
    return table_path, table_origin(table_path, table)


def _refuse_out_dir_over_inputs(out_dir: Path, dataset: Path, inputs: Sequence[Tuple[str, Any]]) -> None:
    """The balanced folder may hold neither the dataset's files nor a file the command reads."""
    if records.same_file(out_dir, dataset):
        raise UsageError(f"OUT_DIR {str(out_dir)!r} is the dataset {str(dataset)!r}; choose another output folder")
    for sub in ("images", "masks"):  # the folders MaskFolder reads
        if records.within(out_dir, dataset / sub):
            raise UsageError(f"OUT_DIR {str(out_dir)!r} is inside the dataset's {sub} folder {str(dataset / sub)!r}; "
                             "choose an output folder outside it")
    if records.within(dataset, out_dir):
        raise UsageError(f"the dataset {str(dataset)!r} is inside OUT_DIR {str(out_dir)!r}; choose another output "
                         "folder")
    for what, path in inputs:
        if path is not None and Path(path).exists() and records.within(path, out_dir):
            raise UsageError(f"{what} {str(path)!r} is inside OUT_DIR {str(out_dir)!r}, which `write` fills; "
                             "move it or choose another output folder")


def _write_dataset(write_balanced, folder, plan, out_dir: Path, args, console: Console):
    """Run the writer; a bar on stderr when it is a terminal and not --quiet."""
    show = not console.quiet and console.stderr.isatty()
    try:
        return write_balanced(folder, plan, out_dir, augment=True if args.augment else None, seed=args.seed,
                              progress=show)
    except KeyboardInterrupt:
        # The atomic writers remove their temporary file when the exception passes
        # through them, but a signal can also land between creating the file and
        # entering that cleanup; the folder is this job's alone, so sweep it.
        for tmp in out_dir.rglob(".tmp-*"):
            with contextlib.suppress(OSError):
                tmp.unlink()
        console.note(f"interrupted: {out_dir} holds the complete items so far and no manifest; "
                     "rerun the same command to finish it")
        raise


def cmd_write(args, console: Console) -> int:
    try:
        import torch  # noqa: F401
        from .segmentation.writer import write_balanced
    except ImportError as exc:
        raise ImportError(f"`cobalance write` needs torch: pip install 'cobalance[torch]' ({one_line(exc)})") \
            from None
    plan_path = require_file(args.plan, "plan")
    plan = load_plan(plan_path)
    dataset = Path(args.dataset)
    if not dataset.is_dir():
        raise UsageError(f"dataset {args.dataset!r} is not a folder")
    table_path, origin = _table_of_plan(plan_path, plan, args.table)
    _refuse_out_dir_over_inputs(Path(args.out_dir), dataset, [
        ("the plan", plan_path), *records.records_of(plan_path, "fit", "the plan's fit record"),
        ("the table", table_path),
        *([] if table_path is None else records.records_of(table_path, "scan", "the table's scan record"))])
    options = {}
    if origin is not None and origin.get("source_format") == "masks":
        recorded = dict(origin["mask_folder"])
        for key in ("tile", "stride"):
            if recorded.get(key) is not None:
                recorded[key] = tuple(recorded[key])
        options.update({k: v for k, v in recorded.items() if v is not None})
        if Path(origin["source"]).resolve() != dataset.resolve():
            console.note(f"note: the plan's table was scanned from {origin['source']}, writing from {dataset}")
    options.update(_mask_folder_options(args))  # the command line overrides what the table recorded
    from .folders import MaskFolder

    folder = MaskFolder(dataset, **options)
    if len(folder) != plan.n_samples:
        cut = f"tiles of {folder.tile[0]}x{folder.tile[1]}" if folder.tile else "whole images"
        raise UsageError(f"the plan has {plan.n_samples} samples but {dataset} has {len(folder)} ({cut}); "
                         "pass the --tile/--stride the table was scanned with")
    result = _write_dataset(write_balanced, folder, plan, Path(args.out_dir), args, console)
    console.print(f"wrote {result.written} items ({result.skipped} already complete) to {args.out_dir}; "
                  f"manifest {result.manifest}")
    console.emit_json({"command": "write", "plan": str(plan_path), "dataset": str(dataset),
                       "out_dir": str(args.out_dir), "manifest": str(result.manifest),
                       "written": result.written, "skipped": result.skipped, "n_items": plan.n_samples_out})
    return EXIT_OK


def _parse_class_weights(text: Optional[str], table: PatternTable) -> Optional[np.ndarray]:
    """``--class-weights`` as one non-negative weight per class of the table (None when not given)."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(",")]
    if any("=" in item for item in items):
        weights = np.ones(table.n_classes)
        seen = set()
        for item in items:
            name, sep, value = item.partition("=")
            name = name.strip()
            if not sep or not name:
                raise UsageError(f"--class-weights: expected CLASS=WEIGHT, got {item!r}")
            if name not in table.class_names:
                raise UsageError(f"--class-weights: unknown class {name!r}; the classes are "
                                 f"{', '.join(table.class_names)}")
            if name in seen:
                raise UsageError(f"--class-weights: class {name!r} is given twice")
            seen.add(name)
            weights[table.class_names.index(name)] = _weight(value, name)
        return weights
    if len(items) != table.n_classes:
        raise UsageError(f"--class-weights lists {len(items)} weights, the table has {table.n_classes} classes "
                         f"({', '.join(table.class_names)})")
    return np.array([_weight(v, name) for v, name in zip(items, table.class_names)])


def _weight(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0.0 <= value < float("inf")):
        raise UsageError(f"--class-weights: the weight of {name!r} must be a finite number >= 0, got {text.strip()!r}")
    return value
