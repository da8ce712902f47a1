"""The `aioti` command line: info, run, bench, demo.

Errors are one line on stderr and exit status 1 (2 for usage errors); `--debug` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

from . import harness
from .errors import check_count, check_duration

__all__ = ["main"]


def _devices(text: str) -> str | list[str]:
    """`--device`: one device, or several separated by commas (a replica pool); `cuda:*` too."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    return parts[0] if len(parts) == 1 else parts


def _count(text: str) -> int:
    """An argument that counts something: an int >= 1."""
    try:
        return check_count("the value", int(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from exc


def _seconds(text: str) -> float:
    """An argument in seconds: a finite number > 0."""
    try:
        return check_duration("the value", float(text), positive=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}") from exc


def _port(text: str) -> int:
    """A TCP port: 0 (any free one) to 65535."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {text!r}")
    return int(text)


def _specialized(c: Any) -> int:
    """How many of the model's arguments are non-tensors, specialized into it at export."""
    if not c.call_spec or not c.call_spec[0]:
        return 0
    import torch.utils._pytree as pytree

    return max(0, pytree.treespec_loads(c.call_spec[0]).num_leaves - c.num_inputs)


def _weights_where(files: Any, c: Any) -> str:
    """Where the model's weights come from, for `aioti info`."""
    if not c.buffers.loaded:
        return "none: pass weights= to aioti.load"
    if files.blob is not None:
        return "stored in the package (blob)"
    if files.weights_config is not None:
        return "stored in the package (torch.save files)"
    return "in the library"


def _info(args: argparse.Namespace) -> int:
    from .core import list_models, open_container, open_model, runmany
    from .replica import devices

    names = list_models(args.path) if args.path.suffix != ".so" else [args.path.stem]
    files = open_model(args.path, args.model_name)
    where = [str(d) for d in devices(args.device)]
    for d in where[1:]:  # each further device: the model must load there too
        open_container(files, device=d).delete()
    c = open_container(files, device=where[0])
    try:
        info: dict[str, Any] = {
            "package": str(args.path), "models": names, "model": files.name,
            "metadata": files.metadata,
            "device": files.metadata.get("AOTI_DEVICE_KEY", "?"),
            "inputs": [{"name": s.label, "spec": s.describe()} for s in c.signature.inputs],
            "outputs": c.output_names,
            "constants": [{"name": k.name, "fqn": k.fqn, "dtype": str(k.dtype), "bytes": k.nbytes,
                           "folded": k.from_folded} for k in c.constants],
            "abi_present": sorted(c.library.available), "abi_missing": sorted(c.library.missing),
            # The package does not record the torch version that built it; the ABI tells the era.
            "built_by": "torch >= 2.13 (full ABI)" if not c.library.missing else
                        "an older torch (e.g. 2.11): some functions are missing",
            "run_loop": runmany.status(),
            "loaded_on": where,
            "weights": _weights_where(files, c),
            "proxy_operators": c.proxy.targets if c.proxy is not None else [],
            "specialized_arguments": _specialized(c),
        }
    finally:
        c.delete()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"package  {info['package']}  (models: {', '.join(names)})")
    print(f"model    {info['model']}  built for {info['device']} by {info['built_by']}")
    for i in info["inputs"]:
        print(f"input    {i['name']}: {i['spec']}")
    if any(".." in i["spec"] for i in info["inputs"]):
        print("ranges   as compiled: inductor may narrow a dim's exported range (the package "
              "does not record that one)")
    print(f"outputs  {', '.join(info['outputs'])}")
    for k in info["constants"]:
        print(f"constant {k['name']} ({k['fqn']}): {k['dtype']}, {k['bytes']} bytes"
              + (", folded" if k["folded"] else ""))
    print(f"weights  {info['weights']}")
    if info["specialized_arguments"]:
        print(f"non-tensor {info['specialized_arguments']} argument(s) specialized at export: the "
              "model computes with the exported values whatever is passed (the package does not "
              "record them, so aioti cannot check them; it warns once)")
    if info["proxy_operators"]:
        print(f"proxy    operators without a C shim, run from Python: "
              f"{', '.join(info['proxy_operators'])}")
    print(f"ABI      {len(info['abi_present'])} functions; missing: "
          f"{', '.join(info['abi_missing']) or 'none'}")
    print(f"runs     {'a chunk per native call' if info['run_loop'] == 'native' else info['run_loop']}")
    print(f"loads on {', '.join(where)}")
    return 0


def _run(args: argparse.Namespace) -> int:
    import anyio
    import torch

    from . import load

    try:
        data = torch.load(args.input, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise OSError(f"cannot read --input {str(args.input)!r}: {exc.strerror or exc}") from exc
    except Exception as exc:  # torch's unpickler: several kinds, some with bare messages
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"--input {str(args.input)!r} is not a torch.save file of tensors "
                         f"({type(exc).__name__}: {why})") from exc

    async def go() -> Any:
        async with load(args.path, device=args.device, model_name=args.model_name,
                        move_inputs=True) as model:
            if isinstance(data, dict) and set(data) == {"args", "kwargs"}:
                return await model(*data["args"], **data["kwargs"])
            if isinstance(data, dict):
                return await model(**data)
            if isinstance(data, (tuple, list)):
                return await model(*data)
            return await model(data)

    out = anyio.run(go)
    import torch.utils._pytree as pytree

    for i, t in enumerate(pytree.tree_leaves(out)):
        print(f"output {i}: {tuple(t.shape)} {t.dtype} mean={t.float().mean().item():.6g}")
    if args.output:
        torch.save(out, args.output)
        print(f"saved to {args.output}")
    return 0


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """Print a table (rich's, when the `cli` extra is installed)."""
    cells = [[f"{c:,.0f}" if isinstance(c, float) and c >= 100 else
              f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        widths = [max(len(x) for x in col) for col in zip(columns, *cells)]
        for row in (columns, *cells):
            print("  ".join(x.rjust(w) for x, w in zip(row, widths)))
        return
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right")
    for row in cells:
        table.add_row(*row)
    Console().print(table)


def _bench(args: argparse.Namespace) -> int:
    import anyio

    from . import Batching, load

    if args.on_loop and not args.batching:
        print("aioti bench: --on-loop needs --batching", file=sys.stderr)
        return 2
    batching = (Batching(max_batch_size=args.batching, on_loop=args.on_loop)
                if args.batching else None)

    async def go() -> dict[str, Any]:
        async with load(args.path, device=args.device, workers=args.workers,
                        batching=batching) as model:
            inputs = model.signature.example(model.device, rows=args.rows)
            await model.run(inputs)
            row = await harness.measure(model, inputs, args.concurrency, args.duration, progress=True)
            row["rows"] = args.rows
            if not args.no_c1:
                row.update(await harness.c1_figure(model, inputs, min(args.duration, 1.0)))
            stats = model.stats()
            if batching is not None:
                row["batch_rows"] = (stats.get("batching") or stats["replicas"][0]["batching"]
                                     )["batch_rows"]
            if "replicas" in stats:
                row["per_replica"] = {r["device"] + f" #{i}": r["completed"]
                                      for i, r in enumerate(stats["replicas"])}
            return row

    row = anyio.run(go, backend=args.backend)
    _table(f"{args.path.name}: {args.concurrency} tasks on {args.backend}, {args.duration:g} s",
           ["rows", "req/s", "p50 ms", "p90 ms", "p99 ms", "loop lag p99 ms", "errors"],
           [[args.rows, row["requests_per_s"], row["p50_ms"], row["p90_ms"], row["p99_ms"],
             row["loop_lag_p99_ms"], row["errors"]]])
    if "c1_p50_ms" in row:
        print(f"one caller (c1): p50 {row['c1_p50_ms']:.3f} ms through aioti against "
              f"{row['direct_p50_ms']:.3f} ms for the direct synchronous call: "
              f"{row['c1_vs_direct']:.2f}x")
    if "per_replica" in row:
        print("requests per replica: " + ", ".join(f"{k}: {v}" for k, v in row["per_replica"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    import anyio
    import torch

    from . import load
    from .testing import cache_dir, compile_model, eager_model

    print(f"aioti demo: model cache {cache_dir()}", flush=True)
    path = _with_status("compiling the demo model (first run only, about 10-40 s)",
                        lambda: compile_model("small_mlp", verbose=False))
    print(f"aioti demo: small MLP (Linear(64,128)-ReLU-Linear(128,10)) compiled at {path}")
    x = torch.randn(8, 64)
    eager = eager_model("small_mlp")
    loader = torch._inductor.aoti_load_package(str(path))

    async def go() -> tuple[dict[str, Any], dict[str, Any], bool]:
        async with load(path) as model:
            got = await model(x)
            ours = await harness.measure(model, [x], 64, args.duration)
        # The eager check runs afterwards: torch ops on this thread would start an OpenMP team
        # that slows the model's own (docs/troubleshooting.md).
        ok = bool(torch.allclose(got, eager(x), atol=1e-5))

        class Naive:
            async def run(self, inputs: list[Any]) -> Any:
                return await anyio.to_thread.run_sync(loader, *inputs)

        naive = await harness.measure(Naive(), [x], 64, args.duration)
        return ours, naive, ok

    ours, naive, ok = anyio.run(go)
    print(f"output matches the eager module: {ok}")
    _table(f"64 concurrent asyncio tasks, {args.duration:g} s each",
           ["", "req/s", "p99 ms", "loop lag p99 ms"],
           [[name, r["requests_per_s"], r["p99_ms"], r["loop_lag_p99_ms"]]
            for name, r in (("aioti", ours), ("anyio.to_thread + torch loader", naive))])
    return 0 if ok else 1


def _with_status(message: str, fn: Any) -> Any:
    """Run `fn` under a spinner with elapsed time when it takes a while."""
    try:
        from rich.console import Console
    except ImportError:
        print(message, file=sys.stderr, flush=True)
        return fn()
    with Console(stderr=True).status(message):
        return fn()


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .serving import app
    except ImportError as exc:
        print(f"aioti serve needs the serve extra (pip install 'aioti[serve]'): {exc}",
              file=sys.stderr)
        return 2
    from . import Batching

    names = list(args.name or [])
    if len(names) > len(args.paths):
        print("aioti serve: more --name than models", file=sys.stderr)
        return 2
    names += [p.stem for p in args.paths[len(names):]]
    if len(set(names)) != len(names):
        print(f"aioti serve: model names must differ, got {names} (use --name)", file=sys.stderr)
        return 2
    batching = Batching(max_batch_size=args.batching) if args.batching else None
    server = app(dict(zip(names, args.paths)), device=args.device, batching=batching,
                 workers=args.workers, max_queue=args.max_queue)
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    print(f"aioti {len(names)} model(s) on {args.device}; OIP at http://{args.host}:{args.port}/v2"
          f", metrics at /metrics ({loop})", file=sys.stderr, flush=True)
    # uvicorn drains on SIGTERM/SIGINT, then raises the signal again to the handler it found:
    # this one, so that a drained server exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    uvicorn.run(server, host=args.host, port=args.port, loop=loop, log_level=args.log_level,
                timeout_graceful_shutdown=args.drain)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aioti", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info", help="what a compiled model expects and exports")
    p.add_argument("path", type=Path)
    p.add_argument("--model-name")
    p.add_argument("--device", type=_devices, default="cpu",
                   help="where to open it: a device, or several separated by commas")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_info)
    p = sub.add_parser("run", help="one run on inputs saved with torch.save")
    p.add_argument("path", type=Path)
    p.add_argument("--input", type=Path, required=True,
                   help="a torch.save file: a tensor, a tuple/list (positional inputs), a dict "
                   "(keyword inputs), or {'args': tuple, 'kwargs': dict} for both")
    p.add_argument("--output", type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model-name")
    p.set_defaults(fn=_run)
    p = sub.add_parser("bench", help="load from N concurrent tasks with random inputs")
    p.add_argument("path", type=Path)
    p.add_argument("--device", type=_devices, default="cpu",
                   help="a device, or several separated by commas (a replica pool), or cuda:*")
    p.add_argument("--concurrency", type=_count, default=64)
    p.add_argument("--duration", type=_seconds, default=5.0)
    p.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    p.add_argument("--workers", type=_count)
    p.add_argument("--rows", type=_count, default=8,
                   help="size of each dynamic dimension of the random inputs (default 8)")
    p.add_argument("--batching", type=_count, metavar="MAX_BATCH", help="enable batching")
    p.add_argument("--on-loop", action="store_true",
                   help="run batches on the event loop's thread (Batching(on_loop=True))")
    p.add_argument("--no-c1", action="store_true",
                   help="skip the one-caller figure (aioti's c1 p50 against the direct call)")
    p.add_argument("--json", type=Path)
    p.set_defaults(fn=_bench)
    p = sub.add_parser("serve", help="serve packages over the Open Inference Protocol (HTTP)")
    p.add_argument("paths", type=Path, nargs="+", metavar="MODEL.pt2")
    p.add_argument("--name", action="append",
                   help="the name of a model, in order (default: its file's stem)")
    p.add_argument("--device", type=_devices, default="cpu",
                   help="a device, or several separated by commas (a replica pool), or cuda:*")
    p.add_argument("--batching", type=_count, metavar="MAX_BATCH", help="enable batching")
    p.add_argument("--workers", type=_count)
    p.add_argument("--max-queue", type=_count, default=1024,
                   help="requests waiting per model before 503 (default 1024)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--drain", type=_seconds, default=30.0,
                   help="seconds to finish requests in flight on SIGTERM/SIGINT (default 30)")
    p.add_argument("--log-level", default="warning")
    p.set_defaults(fn=_serve)
    p = sub.add_parser("demo", help="compile the demo model once and compare with to_thread")
    p.add_argument("--duration", type=_seconds, default=2.0)
    p.set_defaults(fn=_demo)
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args))
    except Exception as exc:
        if args.debug:
            raise
        print(f"aioti: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
