"""Tiny models for tests: the op kinds and counts of their runs are known by hand."""

import torch


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = torch.relu(self.fc1(x))  # the same signature twice: one case, two calls
        return self.fc2(h).softmax(-1)


def make_model():
    torch.manual_seed(0)
    return TwoLayer(), (torch.randn(3, 8),)


class InPlace(torch.nn.Module):
    def forward(self, x):
        y = x.clone()
        y.add_(1.0)  # the case must keep y's value from before the add
        y.mul_(2.0)
        return y


def make_inplace():
    return InPlace(), (torch.arange(6, dtype=torch.float32).reshape(2, 3),)


class Noisy(torch.nn.Module):
    def forward(self, x):
        return x + torch.randn_like(x) + torch.rand(x.shape)


def make_random():
    return Noisy(), (torch.ones(4, 4),)


class Repeats(torch.nn.Module):
    """One big weight used by many calls: content addressing must store it once."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(256, 256))

    def forward(self, x):
        for _ in range(20):
            x = torch.tanh(x @ self.w + 0.01 * x.sum())
        return x


def make_repeats():
    torch.manual_seed(0)
    return Repeats(), (torch.randn(4, 256),)


def make_raises():
    class Boom(torch.nn.Module):
        def forward(self, x):
            x = x * 2
            raise ValueError("kaboom in forward")

    return Boom(), (torch.ones(2),)


def make_bad_return():
    return 42


class SharedTransposedWeight(torch.nn.Module):
    """A transposed parameter view (stored as a dense span) used by calls of two different signatures."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(6, 4))

    def forward(self, x):
        a = torch.mm(x, self.w.t())
        b = torch.mm(x[:1], self.w.t())  # a new signature, the same weight view: served from the hash cache
        return a.sum() + b.sum()


def make_shared_transposed():
    torch.manual_seed(0)
    return SharedTransposedWeight(), (torch.randn(3, 4),)


class LateWrites(torch.nn.Module):
    """Large tensors (recorded by reference, not copied) written in place after they were recorded: by an op on
    an input, through a parameter's .data, and into an op's output. The recording must keep the values the
    recorded calls saw."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(256, 256))

    def forward(self, x):
        a = x @ self.w
        x.mul_(0.0)
        self.w.data.add_(1.0)
        b = torch.tanh(a)
        a.zero_()
        return b + x.sum() + self.w.sum()


def make_late_writes():
    torch.manual_seed(0)
    return LateWrites(), (torch.randn(256, 256),)


class NumpyWrite(torch.nn.Module):
    """Overwrites a recorded output through numpy, which no PyTorch op sees."""

    def forward(self, x):
        y = torch.tanh(x)
        y.detach().numpy()[:] = 0.0
        return y + 1


def make_numpy_write():
    return NumpyWrite(), (torch.ones(256, 256),)


class Endless(torch.nn.Module):
    """Runs small ops of ever new shapes (new cases: commits keep coming) for a minute unless stopped; a time
    limit must cut it short wherever it is, in Python code or in an op."""

    def forward(self, x):
        import time

        end, i = time.monotonic() + 60, 0
        while time.monotonic() < end:
            i += 1
            x = torch.tanh(x[: 1 + i % 200] + i).repeat(2, 1)[:200]
        return x


def make_endless():
    return Endless(), (torch.ones(200, 8),)


class Views(torch.nn.Module):
    """The same op on views whose layout `is_contiguous()` does not show, and on a fresh tensor of the same shape:
    a decode step's query slice [2,4,1,32] with stride 128 on its size-1 dim (as Llama's KV-cache attention makes
    it) and a [1,32] row read at a storage offset."""

    def forward(self, x):
        q = x.transpose(1, 2)  # [2,4,1,32], strides (128, 32, 128, 1)
        fresh = q.clone(memory_format=torch.contiguous_format)  # strides (128, 32, 32, 1)
        row = x.reshape(-1)[32:64].view(1, 32)  # offset 32
        return (q * 2.0).sum() + (fresh * 2.0).sum() + (row * 3.0).sum() + (x.reshape(-1)[:32].view(1, 32) * 3.0).sum()


def make_views():
    torch.manual_seed(0)
    return Views(), (torch.randn(2, 1, 4, 32),)


class Varied(torch.nn.Module):
    """One op (softmax over a row of 16) called 40 times on rows that differ: ordinary ones, one with a big outlier
    (row 17) and one fully masked (row 29: -inf everywhere, as a padded query row of an attention mask)."""

    def forward(self, rows):
        return torch.stack([torch.softmax(rows[i].clone(), -1) for i in range(rows.shape[0])])


def make_varied():
    torch.manual_seed(0)
    rows = torch.randn(40, 16)
    rows[17, 5] = 1e4
    rows[29] = float("-inf")
    return Varied(), (rows,)


class Positions(torch.nn.Module):
    """Integer work as an LLM does it: positions from a cumulative sum over a mask, then a gather."""

    def forward(self, mask, table):
        pos = mask.long().cumsum(-1) - 1
        return table[pos.clamp(min=0)]


def make_positions():
    return Positions(), (torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), torch.randn(8, 3))
