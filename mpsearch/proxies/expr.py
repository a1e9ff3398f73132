"""A small, safe expression language for proxies.

Text is parsed with :mod:`ast` (``mode="eval"``), checked against a whitelist of
node types, names and functions, and compiled into a tree of closures that
compute with torch. Nothing is ever handed to ``eval``/``exec``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch

MAX_LENGTH = 2000
MAX_DEPTH = 64

Value = torch.Tensor
Env = Mapping[str, "torch.Tensor | float"]
Compiled = Callable[[dict[str, Value]], Value]


class ExpressionError(ValueError):
    """An expression that cannot be parsed or evaluated."""


def _normalize(x: Value) -> Value:
    return x / (torch.mean(torch.abs(x)) + 1e-12)


def _minmax(x: Value) -> Value:
    lo, hi = torch.amin(x), torch.amax(x)
    return (x - lo) / (hi - lo + 1e-12)


def _softmax(x: Value) -> Value:
    return torch.softmax(x.reshape(-1), 0).reshape(x.shape)


#: name -> (arity, torch implementation)
FUNCTIONS: dict[str, tuple[int, Callable[..., Value]]] = {
    "abs": (1, torch.abs),
    "sqrt": (1, torch.sqrt),
    "log": (1, torch.log),
    "exp": (1, torch.exp),
    "square": (1, torch.square),
    "sign": (1, torch.sign),
    "sum": (1, torch.sum),
    "mean": (1, torch.mean),
    "norm": (1, lambda x: torch.linalg.vector_norm(x)),
    "max": (1, torch.amax),
    "min": (1, torch.amin),
    "normalize": (1, _normalize),
    # EMQ's further unary operations
    "sigmoid": (1, torch.sigmoid),
    "tanh": (1, torch.tanh),
    "reciprocal": (1, torch.reciprocal),
    "minmax": (1, _minmax),
    "softmax": (1, _softmax),
    "minimum": (2, torch.minimum),
    "maximum": (2, torch.maximum),
}

_BINOPS: dict[type, Callable[[Value, Value], Value]] = {
    ast.Add: torch.add,
    ast.Sub: torch.sub,
    ast.Mult: torch.mul,
    ast.Div: torch.div,
    ast.Pow: torch.pow,
}

_UNARYOPS: dict[type, Callable[[Value], Value]] = {
    ast.USub: torch.neg,
    ast.UAdd: lambda x: x,
}

_OP_SYMBOLS: dict[type, str] = {
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.MatMult: "@",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.BitAnd: "&",
    ast.Not: "not",
    ast.Invert: "~",
}

_NODE_WORDS: dict[type, str] = {
    ast.Attribute: "attribute access",
    ast.Subscript: "subscript",
    ast.Slice: "slice",
    ast.Compare: "comparison",
    ast.BoolOp: "boolean operator",
    ast.IfExp: "conditional expression",
    ast.Lambda: "lambda",
    ast.ListComp: "comprehension",
    ast.SetComp: "comprehension",
    ast.DictComp: "comprehension",
    ast.GeneratorExp: "comprehension",
    ast.JoinedStr: "f-string",
    ast.FormattedValue: "f-string",
    ast.List: "list literal",
    ast.Tuple: "tuple literal",
    ast.Set: "set literal",
    ast.Dict: "dict literal",
    ast.Starred: "starred argument",
    ast.NamedExpr: "assignment expression",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
}


@dataclass(frozen=True)
class Expression:
    """A parsed expression; ``names`` are the primitive names it reads."""

    text: str
    names: frozenset[str]
    _fn: Compiled = field(repr=False, compare=False)

    def __str__(self) -> str:
        return self.text

    def __reduce__(self) -> tuple[Callable[..., Expression], tuple[str, frozenset[str]]]:
        # Closures do not pickle; re-parse instead (the used names suffice).
        return (parse, (self.text, self.names))

    def evaluate(self, env: Env) -> float:
        """Compute the expression with torch on ``env``; the result must be one number."""
        values: dict[str, Value] = {}
        for name in sorted(self.names):
            if name not in env:
                have = ", ".join(sorted(env)) or "none"
                raise ExpressionError(
                    f"name {name!r} is missing from the environment for {self.text!r} (given: {have})"
                )
            values[name] = _as_tensor(name, env[name], self.text)
        try:
            result = self._fn(values)
        except ExpressionError as err:
            raise ExpressionError(f"{err} in {self.text!r}") from err
        except (RuntimeError, TypeError, ValueError) as err:
            raise ExpressionError(f"evaluating {self.text!r} failed: {err}") from err
        if result.numel() != 1:
            raise ExpressionError(
                f"{self.text!r} gives a tensor of shape {tuple(result.shape)} and does not "
                "reduce to one number; wrap it in sum(...) or mean(...)"
            )
        return float(result.item())


def _as_tensor(name: str, value: object, text: str) -> Value:
    """Env value as a floating tensor; low-precision floats are widened to float32."""
    if isinstance(value, torch.Tensor):
        if value.is_complex():
            raise ExpressionError(f"name {name!r} is a complex tensor, in {text!r}")
        if not value.is_floating_point():
            return value.double()
        if value.element_size() < 4:
            return value.float()
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64)
    raise ExpressionError(f"name {name!r} has type {type(value).__name__}, not a tensor or number, in {text!r}")


def parse(text: str, names: Iterable[str]) -> Expression:
    """Parse ``text`` allowing only the primitive ``names`` and the known functions."""
    if isinstance(names, str):
        raise TypeError("names must be an iterable of names, not one string")
    if not isinstance(text, str):
        raise ExpressionError(f"expression must be a string, got {type(text).__name__}")
    allowed = frozenset(names)
    text = text.strip()
    if not text:
        raise ExpressionError("empty expression")
    if len(text) > MAX_LENGTH:
        raise ExpressionError(
            f"expression is too long ({len(text)} characters, at most {MAX_LENGTH}): {text[:60]!r}..."
        )
    depth = 0
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth > MAX_DEPTH:
            raise ExpressionError(f"nesting depth over {MAX_DEPTH} (too many nested parentheses) in {text[:60]!r}...")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as err:
        col = err.offset if err.offset is not None else "?"
        raise ExpressionError(f"syntax error at column {col}: {err.msg} in {text!r}") from err
    except (ValueError, RecursionError, MemoryError) as err:
        raise ExpressionError(f"cannot parse {text!r}: {err}") from err
    used: set[str] = set()
    fn = _Compiler(text, allowed, used).compile(tree.body, 1)
    return Expression(text, frozenset(used), fn)


class _Compiler:
    """Validates an AST and turns it into closures over a name -> tensor dict."""

    def __init__(self, text: str, allowed: frozenset[str], used: set[str]) -> None:
        self.text = text
        self.allowed = allowed
        self.used = used

    def fail(self, what: str) -> ExpressionError:
        return ExpressionError(f"{what} in expression {self.text!r}")

    def compile(self, node: ast.expr, depth: int) -> Compiled:
        if depth > MAX_DEPTH:
            raise self.fail(f"nesting depth over {MAX_DEPTH}")
        if isinstance(node, ast.Constant):
            return self.constant(node.value)
        if isinstance(node, ast.Name):
            return self.name(node.id)
        if isinstance(node, ast.BinOp):
            op = _BINOPS.get(type(node.op))
            if op is None:
                raise self.fail(f"operator {_OP_SYMBOLS.get(type(node.op), '?')!r} is not allowed")
            left = self.compile(node.left, depth + 1)
            right = self.compile(node.right, depth + 1)
            return lambda env: op(left(env), right(env))
        if isinstance(node, ast.UnaryOp):
            uop = _UNARYOPS.get(type(node.op))
            if uop is None:
                raise self.fail(f"operator {_OP_SYMBOLS.get(type(node.op), '?')!r} is not allowed")
            operand = self.compile(node.operand, depth + 1)
            return lambda env: uop(operand(env))
        if isinstance(node, ast.Call):
            return self.call(node, depth)
        word = _NODE_WORDS.get(type(node), type(node).__name__)
        raise self.fail(f"{word} is not allowed")

    def constant(self, value: object) -> Compiled:
        if isinstance(value, bool):
            raise self.fail(f"boolean constant {value!r} is not allowed")
        if isinstance(value, complex):
            raise self.fail(f"complex constant {value!r} is not allowed")
        if not isinstance(value, (int, float)):
            kind = "string" if isinstance(value, (str, bytes)) else type(value).__name__
            raise self.fail(f"{kind} constant {value!r} is not allowed")
        try:
            number = float(value)
        except OverflowError:
            number = float("inf")
        if not torch.isfinite(torch.tensor(number)):
            digits = f"{len(str(value))}-digit" if isinstance(value, int) else str(value)
            raise self.fail(f"constant {digits} number is beyond float64 (at most about 1.8e308)")
        const = torch.tensor(number, dtype=torch.float64)
        return lambda env: const

    def name(self, name: str) -> Compiled:
        if name not in self.allowed:
            known = ", ".join(sorted(self.allowed)) or "none"
            raise self.fail(f"unknown name {name!r} (known names: {known})")
        self.used.add(name)
        return lambda env: env[name]

    def call(self, node: ast.Call, depth: int) -> Compiled:
        if not isinstance(node.func, ast.Name):
            word = _NODE_WORDS.get(type(node.func), type(node.func).__name__)
            raise self.fail(f"only plain function names can be called ({word} is not allowed)")
        fname = node.func.id
        if fname not in FUNCTIONS:
            known = ", ".join(sorted(FUNCTIONS))
            raise self.fail(f"unknown function {fname!r} (known functions: {known})")
        if node.keywords:
            raise self.fail(f"keyword arguments are not allowed in {fname}()")
        if any(isinstance(a, ast.Starred) for a in node.args):
            raise self.fail(f"starred arguments are not allowed in {fname}()")
        arity, impl = FUNCTIONS[fname]
        if len(node.args) != arity:
            raise self.fail(f"function {fname}() takes {arity} argument{'s' * (arity != 1)}, got {len(node.args)}")
        args = [self.compile(a, depth + 1) for a in node.args]
        if arity == 1:
            (arg,) = args
            return lambda env: impl(arg(env))
        return lambda env: impl(*(a(env) for a in args))
