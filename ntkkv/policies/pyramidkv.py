"""PyramidKV: SnapKV scores with budgets falling from the bottom layer to the top (Cai et al., 2024)."""

from __future__ import annotations

from dataclasses import dataclass

from .snapkv import SnapKV


@dataclass
class PyramidKV(SnapKV):
    """beta: ratio of the bottom layer's share to the top layer's (the paper's 20).

    With one integer budget B the layers get window + a linear ramp whose mean is B - window,
    so the layers together hold layers × B; the rounding remainder goes to the lowest layers.
    A list of budgets is used as given. As in the original, a prompt too short for the bottom
    layer's share gets the uniform budget B in every layer instead.
    """

    beta: int = 20
    name = "pyramidkv"

    def layer_budgets(self, num_layers: int, prompt_length: int | None = None) -> list[int]:
        budget = self.budget(prompt_length)
        if not isinstance(budget, int):
            return super().layer_budgets(num_layers, prompt_length)
        budgets = self.pyramid(num_layers, budget)
        if prompt_length is not None and prompt_length < max(budgets):
            return [budget] * num_layers
        return budgets

    def pyramid(self, num_layers: int, budget: int) -> list[int]:
        selectable = budget - self.window_size
        top = selectable / self.beta
        bottom = 2 * selectable - top
        step = (bottom - top) / max(num_layers - 1, 1)
        shares = [int(bottom - layer * step) for layer in range(num_layers)] if num_layers > 1 else [selectable]
        for layer in range(selectable * num_layers - sum(shares)):
            shares[layer % num_layers] += 1
        return [self.window_size + max(share, 1) for share in shares]
