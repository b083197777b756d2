"""Every exception class of kbatch pickles round-trip intact (docs/faults.md): Ray brings an exception raised in
an actor back to the driver by pickling it, and one that does not unpickle reaches the user as
``UnserializableException`` with its message lost (issue 25: ``ChecksumMismatch`` did, on KMS buckets).

The classes are discovered, not listed: every module of the package is imported and every subclass of
``BaseException`` defined in ``kbatch`` is built from its constructor's signature and round-tripped through
``pickle`` and ``ray.cloudpickle``, so a class added later is covered too.
"""
import importlib
import inspect
import pickle
import pkgutil
import typing

import pytest

import kbatch


def _all_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(kbatch.__path__, "kbatch."):
        importlib.import_module(info.name)  # a module that cannot be imported fails here, named
        names.append(info.name)
    return names


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def kbatch_exceptions() -> list[type]:
    _all_modules()
    found = {c for c in _subclasses(BaseException) if c.__module__.split(".")[0] == "kbatch"}
    return sorted(found, key=lambda c: (c.__module__, c.__qualname__))


_SAMPLES = {str: "sample text", int: 7, float: 2.5, bool: True, dict: {"run": "r1", "n": 2},
            list: ["id-1", "id-2"], tuple: ("a", 1), bytes: b"\x00\x01"}


def _sample(name: str, annotation, owner) -> object:
    """A value for a constructor parameter, by its annotation (``str | None`` takes the first that is not
    None); unannotated parameters get a string naming them."""
    if isinstance(annotation, str):
        try:
            annotation = eval(annotation, vars(inspect.getmodule(owner)), {"typing": typing})  # noqa: S307
        except Exception:  # an annotation the module cannot evaluate: a string names the parameter
            return f"{name} value"
    for candidate in typing.get_args(annotation) or (annotation,):
        origin = typing.get_origin(candidate) or candidate
        if origin in _SAMPLES:
            return _SAMPLES[origin]
    return f"{name} value"


def _instance(cls: type) -> BaseException:
    """One instance of ``cls``, every parameter of its ``__init__`` filled (defaults too, so that fields a
    default would hide are checked)."""
    if cls.__init__ is BaseException.__init__ or cls.__init__ is object.__init__:
        return cls(f"a {cls.__name__} for the test")
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return cls(f"a {cls.__name__} for the test")
    args, kwargs = [], {}
    for p in list(sig.parameters.values())[1:]:
        if p.kind is p.VAR_POSITIONAL:
            args.append(f"a {cls.__name__} for the test")
        elif p.kind is p.VAR_KEYWORD:
            continue
        elif p.kind is p.KEYWORD_ONLY:
            kwargs[p.name] = _sample(p.name, p.annotation, cls)
        else:
            args.append(_sample(p.name, p.annotation, cls))
    return cls(*args, **kwargs)


def _state(e: BaseException) -> dict:
    return {k: v for k, v in vars(e).items() if not k.startswith("__")}


def test_the_package_defines_the_classes_this_test_must_see():
    names = {c.__qualname__ for c in kbatch_exceptions()}
    assert {"ChecksumMismatch", "NotEnoughSpace", "ConfigError", "ChangedRows", "InputError"} <= names, names


@pytest.mark.parametrize("cls", kbatch_exceptions(), ids=lambda c: f"{c.__module__}.{c.__qualname__}")
def test_exception_round_trips_through_pickle(cls):
    import ray.cloudpickle

    exc = _instance(cls)
    for dumps, loads in ((pickle.dumps, pickle.loads), (ray.cloudpickle.dumps, ray.cloudpickle.loads)):
        back = loads(dumps(exc))
        assert type(back) is cls
        assert str(back) == str(exc) and back.args == exc.args
        assert _state(back) == _state(exc)
        if isinstance(exc, OSError):
            assert (back.errno, back.strerror) == (exc.errno, exc.strerror)


#: The layers whose code runs in actors (staging, loading, writing); every class is checked by pickle above.
ACTOR_LAYERS = ("kbatch.models", "kbatch.output")


def test_exceptions_raised_in_ray_reach_the_driver_intact(ray_session):
    """What the user sees: each exception of the layers that run in actors, raised in a Ray worker, comes back
    as itself (type, message, fields), never as ``UnserializableException`` (a ChecksumMismatch did)."""
    ray = ray_session

    @ray.remote(num_cpus=1)  # one or two workers, reused: kbatch is imported once per worker
    def throw(exc):
        raise exc

    classes = [c for c in kbatch_exceptions() if c.__module__.startswith(ACTOR_LAYERS)]
    refs = [throw.remote(_instance(cls)) for cls in classes]
    for cls, ref in zip(classes, refs):
        with pytest.raises(ray.exceptions.RayTaskError) as err:
            ray.get(ref, timeout=120)
        cause, want = err.value.cause, _instance(cls)
        assert type(cause) is cls, (cls, type(cause))
        assert str(cause) == str(want) and _state(cause) == _state(want)
        assert isinstance(err.value, cls)  # `except ChecksumMismatch:` catches it on the driver
