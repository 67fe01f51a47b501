"""Run the benchmarks, print markdown tables, write benchmarks/RESULTS.md (see README)."""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def machine() -> dict:
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu,
            "cores": os.cpu_count(), "torch threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version()}


def markdown(table: dict) -> str:
    lines = [f"### {table['title']}", "", "| " + " | ".join(table["header"]) + " |",
             "|" + "---|" * len(table["header"])]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table["rows"]]
    lines += [""] + [f"- {note}" for note in table.get("notes", [])]
    return "\n".join(lines) + "\n"


HEADLINE = ("<!-- headline -->", "<!-- /headline -->")
SECTIONS = ("fusion", "separation", "separation-samples", "corpus", "paper", "scaling", "registration", "memory", "diagnostics", "napari", "distributed",
            "tiled", "speed")


def section_block(name: str, text: str) -> str:
    return f"<!-- section:{name} -->\n{text}<!-- /section:{name} -->\n"


def merge_section(existing: str, name: str, block: str) -> str:
    """``existing`` with the section ``name`` replaced by ``block`` (appended when it has none)."""
    start, end = existing.find(f"<!-- section:{name} -->"), existing.find(f"<!-- /section:{name} -->")
    if start < 0 or end < start:
        return existing.rstrip("\n") + "\n\n" + block
    end += len(f"<!-- /section:{name} -->\n")
    return existing[:start] + block + existing[end:]


def kept_headline(path: Path) -> str:
    """The hand-written headline block (between the HEADLINE markers) of an existing results file, or ""."""
    try:
        text = path.read_text()
    except OSError:
        return ""
    start, end = text.find(HEADLINE[0]), text.find(HEADLINE[1])
    if start < 0 or end < start:
        return ""
    return text[start:end + len(HEADLINE[1])] + "\n"


def _tiled(quick: bool, device: str, images):
    from . import tiled

    return tiled.run(quick, device, images) if "images" in tiled.run.__code__.co_varnames else tiled.run(quick, device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, short budgets (< 5 min on 2 cores)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"), help="markdown file to write ('-': none)")
    parser.add_argument("--images", default=str(HERE.parent / "docs" / "images"),
                        help="folder for result images ('-': none)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections: {', '.join(SECTIONS)}; with a subset, the other sections of "
                             "an existing output file are kept")
    args = parser.parse_args(argv)
    from . import (
        diagnostics,
        distributed,
        fusion,
        memory,
        napari_gui,
        registration,
        scaling,
        separation,
        separation_corpus,
        separation_paper,
        speed,
    )

    info = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    images = None if args.images == "-" else Path(args.images)
    sections = {s.strip() for s in args.only.split(",")}
    unknown = sections - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; use {', '.join(SECTIONS)}")
    runs = {"fusion": lambda: fusion.run(args.quick, args.device, images),
            "separation": lambda: separation.run(args.quick, args.device, images),
            "separation-samples": lambda: separation.run_samples(args.quick, args.device),
            "corpus": lambda: separation_corpus.run(args.quick, args.device),
            "paper": lambda: separation_paper.run(args.quick, args.device, images),
            "scaling": lambda: scaling.run(args.quick, args.device),
            "registration": lambda: registration.run(args.quick, args.device),
            "memory": lambda: memory.run(args.quick, args.device),
            "diagnostics": lambda: diagnostics.run(args.quick, args.device),
            "napari": lambda: napari_gui.run(args.quick, args.device),
            "distributed": lambda: distributed.run(args.quick, args.device),
            "tiled": lambda: _tiled(args.quick, args.device, images),
            "speed": lambda: speed.run(args.quick, args.device)}
    by_section = {name: runs[name]() for name in SECTIONS if name in sections}
    tables = [t for name in by_section for t in by_section[name]]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    body = "\n".join(markdown(t) for t in tables)
    print(body)
    print(f"peak RSS of the whole benchmark process: {peak_mb:.0f} MB")
    if args.output != "-" and sections != set(SECTIONS) and Path(args.output).exists():
        text = Path(args.output).read_text()
        stamp = (f"Command: `python -m benchmarks{' --quick' if args.quick else ''} --device {args.device} --only "
                 f"{args.only}`; machine: " + ", ".join(f"{k} {v}" for k, v in info.items()) + "\n\n")
        for name, section_tables in by_section.items():
            text = merge_section(text, name, section_block(name, stamp + "\n".join(markdown(t)
                                                                                     for t in section_tables)))
        Path(args.output).write_text(text)
        print(f"updated the {', '.join(by_section)} section(s) of {args.output}")
    elif args.output != "-":
        only = "" if sections == set(SECTIONS) else f" --only {args.only}"
        out_arg = "" if Path(args.output).resolve() == (HERE / "RESULTS.md").resolve() else \
            f" --output {Path(args.output).as_posix()}"
        head = ["# napari-nir benchmark results", "", kept_headline(Path(args.output)),
                f"Command: `python -m benchmarks{' --quick' if args.quick else ''} --device {args.device}"
                f"{only}{out_arg}`", "",
                "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
                f"Peak RSS of the benchmark process: {peak_mb:.0f} MB", ""]
        body = "\n".join(section_block(name, "\n".join(markdown(t) for t in section_tables))
                         for name, section_tables in by_section.items())
        Path(args.output).write_text("\n".join(head) + "\n" + body)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
