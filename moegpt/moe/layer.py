"""FFNLayer: the base of every feed-forward layer in the registry, with the hooks a variant may override."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from moegpt.moe.stats import RouterStats

# sums a tensor in place over the data-parallel ranks (the identity in one process)
AllReduce = Callable[[Tensor], None]


class FFNLayer(nn.Module):
    """forward(x_BTC, mask_BT=None) -> (y_BTC, RouterStats); mask_BT is True for real (non-ignored) tokens."""

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, RouterStats]:
        raise NotImplementedError

    def decode(self, h_NC: Tensor, x_NC: Tensor, capture: bool) -> tuple[Tensor, RouterStats | None]:
        """Inference on one new token per sequence (rows [N, C]; h = the normed residual x): x += this layer's
        output in place (x is the step's own residual) and returned, with the layer's stats when `capture`,
        else None (what generation reads). This default runs forward; layers override it with a lean path
        that builds no losses or stats unless they are captured."""
        y_N1C, stats = self(h_NC[:, None])
        return x_NC.add_(y_N1C[:, 0]), stats if capture else None

    def active_params(self, block_size: int) -> int:
        """Parameters one token runs through (block_size: for layers whose cost is shared by a sequence)."""
        raise NotImplementedError

    def init_parameters(self) -> None:
        """Called after the model's generic initialisation, for a variant that needs its own."""

    def after_optimizer_step(self, all_reduce: AllReduce) -> None:
        """Called by the trainer after every optimizer step (state that is updated outside autograd)."""
