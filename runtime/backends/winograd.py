"""Winograd F(4x4, 3x3) for onnxruntime's CPU convolutions: a graph rewrite done when a session loads.

    model = onnx.load("model.onnx")
    n = winograd_convs(model)   # rewritten in place: n 3x3 convolutions

A 3x3 stride-1 convolution of C -> K channels costs 9*C*K multiplies per output pixel. Winograd's
minimal filtering F(4x4, 3x3) computes each 4x4 tile of the output from the 6x6 input tile around it
with 36*C*K multiplies, 2.25 per pixel: 4x fewer. In fp32, with every transform in fp32 and the
filter transform computed in float64 once, outputs differ from the direct convolution by 1e-6 to
1e-5 relative (measured; tests/runtime/test_winograd.py allows 2e-5). onnxruntime's CPU kernels already run the direct convolution near this
CPU's GEMM peak, so fewer multiplies is the only way left to make an fp32 graph faster.

The rewrite uses standard ONNX ops only, so any runtime could run it; it pays where the GEMM is the
bottleneck (onnxruntime on a CPU). The exported file is never changed: TensorRT and cuDNN choose their
own convolution algorithms, so they get the plain graph.

Shape shorthand: N images, C input and K output channels, H, W the map, n = 6 (input tile side),
m = 4 (output tile side), P = n*n = 36 tile positions, Ht = ceil(H / 4), Wt = ceil(W / 4), T = Ht*Wt.

Per convolution (X: (N, C, H, W) -> Y: (N, K, H, W)):
  1. input transform:  a Conv with one input channel over (1, 1, N*C, H, W), 6x6 kernels (B^T d B for
     each of the P positions), stride 4 -> V (1, P, N*C, Ht, Wt), already position-major for step 2;
  2. the products:     MatMul(U (P, 1, K, C), V (P, N, C, T)) -> M (P, N, K, T), P GEMMs;
  3. output transform: one MatMul (A^T m A for every tile: (16, P) @ (P, N*K*T)), each image's 16
     maps side by side, DepthToSpace puts every tile's 4x4 pixels in place -> (N, K, 4*Ht, 4*Wt),
     cropped to H, W, plus the bias.
Measured alone on 2 Zen 4 cores (onnxruntime 1.32, 256 -> 256 channels; an earlier ConvTranspose output
transform, which this one beats): 0.60x the direct Conv's time at 152x200, 0.74x at 76x100 and 38x50,
1.15x at 19x25; 64 -> 64 at 152x200 1.18x. Hence the channel floor below; the small maps of the
coarsest FPN levels lose about 1 ms in all.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import numpy_helper

M_OUT = 4  # output tile side
KERNEL = 3
N_IN = M_OUT + KERNEL - 1  # input tile side, 6
POSITIONS = N_IN * N_IN  # 36
# Toom-Cook interpolation points (plus the point at infinity): the usual choice for F(4, 3), whose
# transforms have small integer entries; (0, +-1, +-1/2) measured about the same error here
POINTS = (0.0, 1.0, -1.0, 2.0, -2.0)
MIN_CHANNELS = 128  # C and K both at least this: below, the transforms cost more than the GEMMs save


@functools.cache
def transforms() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """F(4, 3) in float64: A^T (m, n), G (n, r), B^T (n, n), with for any d (n,) and g (r,)
    A^T ((G g) * (B^T d)) = the correlation y_i = sum_k d[i + k] g[k], i < m.

    A^T evaluates the product polynomial at the points (and takes its leading coefficient for the
    point at infinity), G evaluates the filter polynomial with Lagrange's denominators folded in, and
    B^T is the one matrix that makes the identity hold: it is linear in B^T, so solved exactly."""
    m, r, n = M_OUT, KERNEL, N_IN
    a = np.asarray(POINTS, np.float64)
    at = np.zeros((m, n))
    g = np.zeros((n, r))
    for j, p in enumerate(a):
        at[:, j] = p ** np.arange(m)
        g[j] = p ** np.arange(r) / np.prod([p - q for q in a if q != p])
    at[m - 1, n - 1] = 1.0
    g[n - 1, r - 1] = 1.0
    # sum_j AT[i, j] G[j, k] BT[j, q] = [q == i + k] for all i, k, q: m*r*n equations in n*n unknowns
    eqs = np.zeros((m, r, n, n, n))
    rhs = np.zeros((m, r, n))
    for i in range(m):
        for k in range(r):
            rhs[i, k, i + k] = 1.0
            for q in range(n):
                eqs[i, k, q, :, q] = at[i] * g[:, k]
    bt, *_ = np.linalg.lstsq(eqs.reshape(m * r * n, n * n), rhs.reshape(-1), rcond=None)
    bt = bt.reshape(n, n)
    residual = np.abs(eqs.reshape(m * r * n, n * n) @ bt.reshape(-1) - rhs.reshape(-1)).max()
    if residual > 1e-9:
        raise ArithmeticError(f"Winograd F({m}, {r}) transforms inconsistent (residual {residual:.1e})")
    return at, g, bt


def filter_transform(weight: np.ndarray) -> np.ndarray:
    """(K, C, 3, 3) fp32 -> U (P, 1, K, C) fp32: G g G^T per filter, computed in float64."""
    _, g, _ = transforms()
    k, c = weight.shape[:2]
    w = weight.reshape(k * c, KERNEL * KERNEL).T.astype(np.float64)  # (9, K*C)
    u = np.kron(g, g) @ w  # (P, 9) @ (9, K*C): row i*n + j is sum_ab G[i, a] G[j, b] g[a, b]
    return u.astype(np.float32).reshape(POSITIONS, 1, k, c)


def input_kernels() -> np.ndarray:
    """(P, 1, 1, n, n): output position (i, j) of the 6x6 tile d is sum_pq B^T[i, p] B^T[j, q] d[p, q]."""
    _, _, bt = transforms()
    return np.einsum("ip,jq->ijpq", bt, bt).reshape(POSITIONS, 1, 1, N_IN, N_IN).astype(np.float32)


def output_transform() -> np.ndarray:
    """(m*m, P): output pixel (i, j) of a tile, row i*m + j, is sum_pq A^T[i, p] A^T[j, q] M[p, q]."""
    at, _, _ = transforms()
    return np.einsum("ip,jq->ijpq", at, at).reshape(M_OUT * M_OUT, POSITIONS).astype(np.float32)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _eligible(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], min_channels: int) -> bool:
    """A float32 3x3 Conv, stride 1, dilation 1, one group, padding 1, weights (and bias) constant."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return False
    w = inits.get(node.input[1])
    if w is None or w.data_type != onnx.TensorProto.FLOAT or list(w.dims[2:]) != [KERNEL, KERNEL]:
        return False
    if len(w.dims) != 4 or w.dims[0] < min_channels or w.dims[1] < min_channels:
        return False
    if len(node.input) > 2 and node.input[2] and node.input[2] not in inits:
        return False
    a = _attrs(node)
    auto_pad = a.get("auto_pad", b"NOTSET")
    return (auto_pad in (b"NOTSET", "NOTSET") and list(a.get("pads", [0] * 4)) == [1, 1, 1, 1]
            and list(a.get("strides", [1, 1])) == [1, 1] and list(a.get("dilations", [1, 1])) == [1, 1]
            and a.get("group", 1) == 1 and list(a.get("kernel_shape", [KERNEL, KERNEL])) == [KERNEL, KERNEL])


class _Builder:
    """New initializers and nodes for the rewrite, with names that cannot clash with the graph's."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.taken = ({i.name for i in graph.initializer} | {i.name for i in graph.input}
                      | {v for nd in graph.node for v in nd.output})
        self.consts: dict[tuple, str] = {}

    def name(self, base: str) -> str:
        name, i = f"winograd/{base}", 0
        while name in self.taken:
            i += 1
            name = f"winograd/{base}.{i}"
        self.taken.add(name)
        return name

    def const(self, key: tuple, make) -> str:
        """One initializer per key, shared by every rewritten convolution that needs it."""
        if key not in self.consts:
            name = self.name("_".join(str(k) for k in key))
            self.graph.initializer.append(numpy_helper.from_array(make(), name))
            self.consts[key] = name
        return self.consts[key]

    def ints(self, *values: int) -> str:
        return self.const(("i64", *values), lambda: np.asarray(values, np.int64))


def _rewrite_one(b: _Builder, node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> list[onnx.NodeProto]:
    """The nodes that compute `node`'s output the Winograd way (module docstring, steps 1-3)."""
    x, w_name, y = node.input[0], node.input[1], node.output[0]
    weight = numpy_helper.to_array(inits[w_name])
    k, c = weight.shape[:2]
    u = b.const(("U", w_name), lambda: filter_transform(weight))
    wb = b.const(("input_kernels",), input_kernels)
    aa = b.const(("output_transform",), output_transform)
    t = {s: b.name(f"{node.name or y}/{s}") for s in
         ("x5", "x1", "v5", "vshape", "hwt", "v", "vflat", "m", "m2", "y16", "yshape", "y5", "yt", "dshape", "yd", "y2",
          "xshape", "hw", "crop")}
    make = onnx.helper.make_node
    nodes = [
        make("Unsqueeze", [x, b.ints(0)], [t["x5"]]),  # (N, C, H, W) -> (1, N, C, H, W)
        make("Reshape", [t["x5"], b.ints(1, 1, -1, 0, 0)], [t["x1"]]),  # -> (1, 1, N*C, H, W)
        # padding 1 before; 4 after makes floor((H + 5 - 6) / 4) + 1 = ceil(H / 4) tiles
        make("Conv", [t["x1"], wb], [t["v5"]], strides=[1, M_OUT, M_OUT], pads=[0, 1, 1, 0, M_OUT, M_OUT]),
        make("Shape", [t["v5"]], [t["vshape"]]),
        make("Slice", [t["vshape"], b.ints(3), b.ints(5)], [t["hwt"]]),  # [Ht, Wt]
        make("Reshape", [t["v5"], b.ints(POSITIONS, -1, c, 0, 0)], [t["v"]]),  # (1, P, N*C, Ht, Wt) -> (P, N, C, Ht, Wt)
        make("Reshape", [t["v"], b.ints(0, 0, 0, -1)], [t["vflat"]]),  # -> (P, N, C, T)
        make("MatMul", [u, t["vflat"]], [t["m"]]),  # (P, 1, K, C) @ (P, N, C, T) -> (P, N, K, T)
        make("Reshape", [t["m"], b.ints(POSITIONS, -1)], [t["m2"]]),  # -> (P, N*K*T)
        make("MatMul", [aa, t["m2"]], [t["y16"]]),  # (m*m, P) @ (P, N*K*T) -> (m*m, N*K*T)
        make("Concat", [b.ints(M_OUT * M_OUT, -1, k), t["hwt"]], [t["yshape"]], axis=0),
        make("Reshape", [t["y16"], t["yshape"]], [t["y5"]]),  # -> (m*m, N, K, Ht, Wt)
        make("Transpose", [t["y5"]], [t["yt"]], perm=[1, 0, 2, 3, 4]),  # -> (N, m*m, K, Ht, Wt): whole maps move
        make("Concat", [b.ints(-1, M_OUT * M_OUT * k), t["hwt"]], [t["dshape"]], axis=0),
        make("Reshape", [t["yt"], t["dshape"]], [t["yd"]]),  # -> (N, m*m*K, Ht, Wt), channel (i*m + j)*K + k
        make("DepthToSpace", [t["yd"]], [t["y2"]], blocksize=M_OUT, mode="DCR"),  # -> (N, K, 4Ht, 4Wt)
        make("Shape", [x], [t["xshape"]]),
        make("Slice", [t["xshape"], b.ints(2), b.ints(4)], [t["hw"]]),  # [H, W]
    ]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    crop_out = t["crop"] if bias else y
    nodes.append(make("Slice", [t["y2"], b.ints(0, 0), t["hw"], b.ints(2, 3)], [crop_out]))  # -> (N, K, H, W)
    if bias:
        b4 = b.const(("bias", bias), lambda: numpy_helper.to_array(inits[bias]).reshape(1, k, 1, 1))
        nodes.append(make("Add", [crop_out, b4], [y]))
    for nd in nodes:
        nd.name = b.name(f"{node.name or y}/{nd.op_type}")
    return nodes


def winograd_convs(model: onnx.ModelProto, *, min_channels: int = MIN_CHANNELS) -> int:
    """Rewrite, in place, every eligible top-level Conv of `model` (_eligible) to F(4x4, 3x3); returns
    how many. Weights no longer used by any node are dropped. (In place: an R50-FPN graph is 169 MB.)"""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    b = _Builder(graph)
    nodes, count = [], 0
    for node in graph.node:
        if _eligible(node, inits, min_channels):
            nodes += _rewrite_one(b, node, inits)
            count += 1
        else:
            nodes.append(node)
    if not count:
        return 0
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for nd in graph.node for name in nd.input}
    used |= {o.name for o in graph.output}
    used |= _subgraph_inputs(graph)
    for i in reversed(range(len(graph.initializer))):  # in place: the kept weights are not copied
        if graph.initializer[i].name not in used:
            del graph.initializer[i]
    return count


def _subgraph_inputs(graph: onnx.GraphProto) -> set[str]:
    """Names that If/Loop/Scan bodies read from the outer scope (they must not be dropped)."""
    names: set[str] = set()
    for nd in graph.node:
        for a in nd.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                names |= {i for sub in g.node for i in sub.input}
                names |= _subgraph_inputs(g)
    return names
