"""torch's own in-process pattern for the precompile context and the dynamo cache (the shape
of PyTorch's tests of ``DynamoCache`` and ``PrecompileContext``, written here): compile, save
with ``PrecompileContext.save_to_dynamo_cache()``, ``torch._dynamo.reset()`` and
``PrecompileContext.clear()`` (a new process, as far as torch can tell), then compile again
under ``fail_on_recompile``: the frame must come from the dynamo cache, here pcx.

Skipped, saying so, where torch is not installed (`.ci/run` installs it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import pytest

import pcx

torch = pytest.importorskip("torch", reason="torch is not installed (.ci/run installs it)")


@pytest.fixture
def on_pcx(served: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[pcx.Client]:
    import pcx.torch
    from torch._dynamo.package import DynamoCache
    from torch._dynamo.precompile_context import PrecompileContext

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    client = pcx.torch.install(pcx.Client.connect(str(served.socket)), namespace="in-process")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    DynamoCache.clear()
    PrecompileContext.clear()
    try:
        with torch._dynamo.config.patch(caching_precompile=True):
            yield client
    finally:
        pcx.torch.uninstall()
        torch._dynamo.reset()


def entry_key(fn: Any) -> str:
    from torch._dynamo.package import CompilePackage

    return str(CompilePackage.source_id_from_fn(fn))


def reload_as_torch_tests_do() -> None:
    from torch._dynamo.precompile_context import PrecompileContext

    torch._dynamo.reset()
    PrecompileContext.clear()


def test_save_reset_and_compile_again_loads_every_frame_from_pcx(on_pcx: pcx.Client) -> None:
    from torch._dynamo.precompile_context import PrecompileContext
    from torch._dynamo.utils import counters

    def fn(x: Any) -> Any:
        return x.sin() + x.cos()

    x = torch.randn(4, 3)
    expected = torch.compile(fn)(x)
    debug_info = PrecompileContext.save_to_dynamo_cache()
    assert len(debug_info["dynamo"]) == 1 and len(debug_info["backends"]) == 1, debug_info
    # What torch saved is pcx's: the entry is in the namespace, its artifacts in the log.
    listed = on_pcx.list_cache_entries()
    assert len(listed) == 1, listed
    reload_as_torch_tests_do()
    with torch.compiler.set_stance("fail_on_recompile"):
        assert torch.equal(torch.compile(fn)(x), expected)
    assert counters["dynamo_cache"]["dynamo_cache_hit"] == 1


def test_dynamo_cache_save_and_load_and_install_package_round_trip(on_pcx: pcx.Client) -> None:
    from torch._dynamo.package import DynamoCache
    from torch._dynamo.precompile_context import PrecompileContext

    def fn(x: Any) -> Any:
        return x * 2 + 1

    x = torch.randn(5)
    compiled = torch.compile(fn)
    expected = compiled(x)
    PrecompileContext.save_to_dynamo_cache()
    entry = DynamoCache.load(fn)
    assert entry is not None and len(entry.backends) == 1
    assert [e["key"] for e in on_pcx.list_cache_entries()] == [entry_key(fn)]
    reload_as_torch_tests_do()
    package = DynamoCache.load_and_install_package(fn)
    assert package is not None
    with torch.compiler.set_stance("fail_on_recompile"):
        assert torch.equal(torch.compile(fn)(x), expected)


def test_clearing_the_dynamo_cache_makes_the_next_compile_a_miss(on_pcx: pcx.Client) -> None:
    from torch._dynamo.package import DynamoCache
    from torch._dynamo.precompile_context import PrecompileContext
    from torch._dynamo.utils import counters

    def fn(x: Any) -> Any:
        return x - 3

    torch.compile(fn)(torch.randn(2))
    PrecompileContext.save_to_dynamo_cache()
    DynamoCache.clear()
    assert on_pcx.list_cache_entries() == []
    reload_as_torch_tests_do()
    assert DynamoCache.load(fn) is None
    assert counters["dynamo_cache"]["dynamo_cache_miss"] >= 1


def test_install_leaves_the_context_and_namespace_of_the_client_it_is_given_as_they_were(
    served: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: ``install(client)`` set the given client's ``context`` and ``namespace``
    to torch's (this process's context, the torch cache directory's namespace), so the
    caller's own requests through it afterwards went, without a word, into torch's context
    and namespace instead of the default ones it had been using: a record the next process
    looked for in the default context was not there. Now torch gets a view of the connection
    in its own context and namespace, and the client given keeps its own."""
    import pcx.torch

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    mine = pcx.Client.connect(str(served.socket))
    try:
        torch_side = pcx.torch.install(mine)
        assert str(torch_side.context).startswith("torch@")
        assert (mine.context, mine.namespace) == (None, None)
        mine.record_artifact("mine", b"x")
        mine.put_cache_entry(
            "saved-by-me",
            {"dynamo": {"device_type": "cpu", "codes": [{"backend_ids": []}]}, "backends": {}},
        )
    finally:
        pcx.torch.uninstall()
    with pcx.Client.connect(str(served.socket)) as other:
        assert other.serialize_artifact_by_key("mine")["content_b64"] == b"x"
        assert other.get_cache_entry("saved-by-me") is not None
    mine.close()


def test_install_from_many_threads_at_once_installs_once_and_uninstall_puts_torchs_own_back(
    served: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: ``install()`` is idempotent, but threads of a pool that each called it at
    the same moment all found nothing installed yet, and each put its hooks over the one
    before, saving that one's hooks as "torch's own": ``uninstall()`` then put back another
    thread's pcx hooks (torch went on recording into pcx through a client no one held, while
    ``installed()`` said ``None``), and a fall-back for an unreachable server did the same.
    Now install and uninstall are serialised: every thread gets the one client installed,
    and uninstall puts torch's own methods back."""
    import threading

    import pcx.torch
    from torch._dynamo.precompile_context import PrecompileContext

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torchs_own = dict(PrecompileContext.__dict__)
    barrier = threading.Barrier(8)
    installed: list = []

    def install() -> None:
        barrier.wait(timeout=30)
        installed.append(pcx.torch.install(pcx.Client.connect(str(served.socket))))

    threads = [threading.Thread(target=install) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert len(installed) == 8
        assert len({id(c) for c in installed}) == 1, "one client installed, for every thread"
    finally:
        pcx.torch.uninstall()
    changed = [
        name
        for name in ("record_artifact", "clear", "save_to_dynamo_cache", "_backend_artifacts_by_key")
        if PrecompileContext.__dict__[name] is not torchs_own[name]
    ]
    assert changed == [], f"still pcx's after uninstall: {changed}"
    assert pcx.torch.installed() is None


def test_a_torch_process_that_exits_leaves_no_context_behind_in_the_server(
    served: Any, tmp_path: Path
) -> None:
    """Regression: each torch process records into a context of its own in the shared server
    (as torch's precompile context is per process), and none was ever dropped: every rank of
    every run, every notebook kernel restarted, left its artifacts and entries in the
    server's state for good, growing its memory, its snapshots and its restarts without
    bound, though torch's own context ends with its process. Now a process drops the context
    ``install()`` made for it when it exits (saved entries are in the dynamo cache, and the
    log keeps the history)."""
    import subprocess
    import sys

    code = (
        "import sys, pcx, pcx.torch\n"
        "c = pcx.torch.install(pcx.Client.connect(sys.argv[1]))\n"
        "c.record_artifact('a', b'compiled')\n"
        "print(c.context)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(served.socket)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")},
    )
    assert done.returncode == 0, done.stderr
    context = done.stdout.strip()
    assert context.startswith("torch@"), done.stdout
    with pcx.Client.connect(str(served.socket)) as c:
        names = [x["name"] for x in c.list_contexts()]
        assert context not in names, names
        # The history is still there: the record, then the drop.
        events = [e["event"] for e in c.log() if e.get("context") == context]
        assert events[0] == "ArtifactRecorded" and events[-1] == "ContextDropped", events
        logged = len(c.log())
    # A process that recorded nothing leaves nothing, not even a drop.
    idle = subprocess.run(
        [sys.executable, "-c", code.replace("c.record_artifact('a', b'compiled')\n", ""),
         str(served.socket)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")},
    )
    assert idle.returncode == 0, idle.stderr
    with pcx.Client.connect(str(served.socket)) as c:
        assert len(c.log()) == logged, c.log()[logged:]


def test_a_fall_back_for_what_pcx_refused_leaves_the_callers_own_client_working(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: ``install(client)`` gives torch a view of the caller's own connection, and
    when pcx refused what torch recorded (an artifact over ``max_content_bytes``) the
    fall-back to torch's own context closed that connection, though it was in step: the
    caller's client (one a thread pool shares, say) then failed every request with
    ``pcx.TransportError`` ("the client was closed"). Now a fall-back closes the connection
    only when it is broken anyway."""
    import pcx.torch
    from conftest import Served

    monkeypatch.setenv("PCX_MAX_CONTENT_BYTES", "2000")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    small = Served(tmp_path / "small-limit")
    mine = pcx.Client.connect(str(small.socket))
    try:
        pcx.torch.install(mine, namespace="refused")
        torch._dynamo.reset()
        with torch._dynamo.config.patch(caching_precompile=True):
            x = torch.randn(8, 8)
            torch.compile(lambda t: (t @ t).relu().sum(dim=0))(x)
        assert pcx.torch.installed() is None, "pcx refused the artifact and torch fell back"
        assert mine.record_artifact("mine", b"x")["ok"]
        assert mine.serialize_artifact_by_key("mine")["content_b64"] == b"x"
    finally:
        pcx.torch.uninstall()
        torch._dynamo.reset()
        mine.close()
        small.stop()


@pytest.fixture
def torch_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """torch with its own context and cache (pcx not installed), caching precompile on."""
    import pcx.torch
    from torch._dynamo.precompile_context import PrecompileContext

    pcx.torch.uninstall()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    PrecompileContext.clear()
    try:
        with torch._dynamo.config.patch(caching_precompile=True):
            yield
    finally:
        pcx.torch.uninstall()
        torch._dynamo.reset()
        PrecompileContext.clear()


def test_an_install_after_compiles_keeps_what_torch_recorded_before_it(
    served: Any, torch_alone: None
) -> None:
    """Regression: ``install()`` put empty dicts in place of torch's, so what torch had
    recorded before it (a compile made first, then ``import pcx.torch; install()``) was in
    no save made afterwards: ``save_cache_artifacts()`` saved nothing, answered as usual, and
    the next process compiled everything again. Now install records it into pcx."""
    import pcx.torch
    from torch._dynamo.precompile_context import PrecompileContext
    from torch._dynamo.utils import counters

    def fn(x: Any) -> Any:
        return x.sin() * 3 - x

    x = torch.randn(4, 3)
    expected = torch.compile(fn)(x)  # recorded in torch's own context
    client = pcx.torch.install(pcx.Client.connect(str(served.socket)), namespace="late")
    PrecompileContext.save_to_dynamo_cache()
    assert [e["key"] for e in client.list_cache_entries()] == [entry_key(fn)]
    reload_as_torch_tests_do()
    with torch.compiler.set_stance("fail_on_recompile"):
        assert torch.equal(torch.compile(fn)(x), expected)
    assert counters["dynamo_cache"]["dynamo_cache_hit"] == 1


def test_an_uninstall_hands_torch_back_what_was_recorded_while_installed(
    served: Any, torch_alone: None
) -> None:
    """Regression: ``uninstall()`` put back torch's dicts as they were before ``install()``,
    so what torch recorded while pcx was installed was in no save made after it: a save on
    torch's own cache (or after installing again) saved nothing and the next process
    compiled everything again. Now torch's own context gets it back, as after a fall-back."""
    import pcx.torch
    from torch._dynamo.precompile_context import PrecompileContext
    from torch._dynamo.utils import counters

    def fn(x: Any) -> Any:
        return x.cos() * 5 + x

    def other(x: Any) -> Any:
        return x.exp() - 2

    x = torch.randn(4, 3)
    pcx.torch.install(pcx.Client.connect(str(served.socket)), namespace="handed-back")
    expected = torch.compile(fn)(x)
    pcx.torch.uninstall()
    PrecompileContext.save_to_dynamo_cache()  # torch's own, on files
    # Installed again: what torch holds goes back to pcx with it.
    client = pcx.torch.install(pcx.Client.connect(str(served.socket)), namespace="again")
    expected_other = torch.compile(other)(x)
    PrecompileContext.save_to_dynamo_cache()
    assert sorted(e["key"] for e in client.list_cache_entries()) == sorted(
        [entry_key(fn), entry_key(other)]
    )
    pcx.torch.uninstall()
    reload_as_torch_tests_do()
    with torch.compiler.set_stance("fail_on_recompile"):
        assert torch.equal(torch.compile(fn)(x), expected)  # from torch's own files
    assert counters["dynamo_cache"]["dynamo_cache_hit"] == 1
    pcx.torch.install(pcx.Client.connect(str(served.socket)), namespace="again")
    reload_as_torch_tests_do()
    with torch.compiler.set_stance("fail_on_recompile"):
        assert torch.equal(torch.compile(other)(x), expected_other)
        assert torch.equal(torch.compile(fn)(x), expected)
    assert counters["dynamo_cache"]["dynamo_cache_hit"] == 3


def test_the_bytes_save_cache_artifacts_returns_carry_the_dynamo_entries_to_a_hot_load(
    served: Any, torch_alone: None
) -> None:
    """Regression: torch's save records each dynamo entry it writes for its hot load, so the
    bytes ``torch.compiler.save_cache_artifacts()`` returns carry them (``precompile`` in
    its ``CacheInfo``); pcx's save did not, so those bytes, shipped to another machine and
    given to ``torch.compiler.load_cache_artifacts()``, warm-started nothing; and a hot load
    in a process with pcx installed wrote the entries into torch's directory, where its
    loads (from pcx) never looked. Now both go through pcx as through torch's own cache."""
    import pcx.torch
    from torch._dynamo.utils import counters

    def fn(x: Any) -> Any:
        return x.tanh() * 2 + x

    x = torch.randn(4, 3)
    pcx.torch.install(pcx.Client.connect(str(served.socket)), namespace="hot-save")
    expected = torch.compile(fn)(x)
    saved = torch.compiler.save_cache_artifacts()
    assert saved is not None
    artifacts, info = saved
    # (Earlier saves of this process are carried too: torch's manager keeps them.)
    assert entry_key(fn) in info.artifacts["precompile"], info
    pcx.torch.uninstall()
    # Another machine: a cache of its own, with nothing in it.
    client = pcx.torch.install(pcx.Client.connect(str(served.socket)), namespace="hot-load")
    reload_as_torch_tests_do()
    torch.compiler.load_cache_artifacts(artifacts)
    assert entry_key(fn) in [e["key"] for e in client.list_cache_entries()]
    with torch.compiler.set_stance("fail_on_recompile"):
        assert torch.equal(torch.compile(fn)(x), expected)
    assert counters["dynamo_cache"]["dynamo_cache_hit"] == 1


def test_a_cache_directory_set_after_install_keeps_its_dynamo_cache_apart(
    served: Any, torch_alone: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: with no namespace named, pcx.torch fixed its namespace from torch's cache
    directory once, at ``install()``; torch's ``DynamoCache`` finds its directory at each
    call. So two scripts that each set ``TORCHINDUCTOR_CACHE_DIR`` after ``PCX_TORCH=1``
    installed at interpreter start (or one in ``fresh_cache()``) shared one dynamo cache,
    where stock torch kept them apart: a function of one at the same name and line as the
    other's loaded the other's entry, and torch then failed in the user's call (``NameError:
    name '__compiled_fn_…' is not defined``). Now the namespace follows the directory."""
    import pcx.torch
    from torch._dynamo.package import DynamoCache
    from torch._dynamo.precompile_context import PrecompileContext
    from torch._dynamo.utils import counters

    monkeypatch.delenv("PCX_TORCH_NAMESPACE", raising=False)
    client = pcx.torch.install(pcx.Client.connect(str(served.socket)))

    def fn(x: Any) -> Any:
        return x.sigmoid() * 7

    x = torch.randn(4, 3)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "project-a"))
    torch.compile(fn)(x)
    PrecompileContext.save_to_dynamo_cache()
    assert [e["key"] for e in client.list_cache_entries()] == [entry_key(fn)]
    # Another project's directory: nothing of project A's is there, as on torch's files.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "project-b"))
    reload_as_torch_tests_do()
    assert DynamoCache.load(fn) is None
    assert counters["dynamo_cache"]["dynamo_cache_miss"] == 2
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "project-a"))
    assert DynamoCache.load(fn) is not None
