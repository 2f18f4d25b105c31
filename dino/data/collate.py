"""Batch collation for DINOv2: stack the crops and draw the iBOT masks of the global crops.

Randomness: Python's global ``random`` module only (mask ratios, the shuffle, and the
MaskingGenerator), as upstream; the data loader seeds it per batch.
"""

import random

import torch


def _stack_crops(samples_list, key):
    counts = {len(s[0][key]) for s in samples_list}
    if len(counts) != 1:
        raise ValueError(f"collate_data_and_cast: samples disagree on the number of {key}: {sorted(counts)}")
    n_crops = counts.pop()
    # crop-major order: [crop 0 of every sample, crop 1 of every sample, ...]
    return torch.stack([s[0][key][i] for i in range(n_crops) for s in samples_list])


def collate_data_and_cast(samples_list, mask_ratio_tuple, mask_probability, dtype, n_tokens=None, mask_generator=None):
    """Collate ``[(crops_dict, target), ...]`` from ``DataAugmentationDINO`` into a DINOv2 batch.

    Of the 2B global crops, ``int(2B * mask_probability)`` get a block mask; their mask
    ratios are spread over ``mask_ratio_tuple`` (one sub-interval each, a uniform draw
    within it), and the masks are shuffled over the crops.

    Returns a dict:
        collated_global_crops (2B, 3, H, W) and collated_local_crops (nL*B, 3, h, w), in ``dtype``
            (uint8 crops, not yet normalised, stay uint8: see ``augmentations.normalize_uint8``);
        collated_masks: bool (2B, N);
        mask_indices_list: flat indices of the masked entries of ``collated_masks``;
        masks_weight: 1/#masked of each masked token's image, one per masked token;
        upperbound: an upper bound on the number of masked tokens (for fixed-size buffers);
        n_masked_patches: long tensor (1,) with the number of masked tokens;
        collated_global_params / collated_local_params: only for crops whose photometric steps run on the
            device, the (n, N_PARAMS) parameters in the crops' order.
    """
    if not samples_list:
        raise ValueError("collate_data_and_cast: empty batch")
    if mask_generator is None:
        raise ValueError("collate_data_and_cast: a mask_generator (MaskingGenerator) is required")
    grid_tokens = mask_generator.num_patches
    N = grid_tokens if n_tokens is None else n_tokens
    if N != grid_tokens:
        raise ValueError(f"collate_data_and_cast: n_tokens={n_tokens} but the mask generator's grid has {grid_tokens}")
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"collate_data_and_cast: mask_probability must be in [0, 1], got {mask_probability}")

    collated_global_crops = _stack_crops(samples_list, "global_crops")
    collated_local_crops = _stack_crops(samples_list, "local_crops")

    B = len(collated_global_crops)
    n_samples_masked = int(B * mask_probability)
    probs = torch.linspace(*mask_ratio_tuple, n_samples_masked + 1).tolist()
    upperbound = 0
    masks_list = []
    for i in range(n_samples_masked):
        prob_min, prob_max = probs[i], probs[i + 1]
        masks_list.append(torch.from_numpy(mask_generator(int(N * random.uniform(prob_min, prob_max)))))
        upperbound += int(N * prob_max)
    for _ in range(n_samples_masked, B):
        masks_list.append(torch.from_numpy(mask_generator(0)))
    random.shuffle(masks_list)

    collated_masks = torch.stack(masks_list).flatten(1)
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    masks_weight = (1 / collated_masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(collated_masks)[collated_masks]

    def cast(crops):
        return crops if crops.dtype == torch.uint8 else crops.to(dtype)

    # Photometric parameters of crops augmented on the device (dino.data.photometric), in the crops' order.
    params = {f"collated_{kind}_params": _stack_crops(samples_list, f"{kind}_crops_params")
              for kind in ("global", "local") if f"{kind}_crops_params" in samples_list[0][0]}
    return {
        **params,
        "collated_global_crops": cast(collated_global_crops),
        "collated_local_crops": cast(collated_local_crops),
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
    }
