"""DINOv2 student/teacher meta-architecture: DINO [CLS] loss, iBOT masked-patch loss, KoLeo.

The backbone is built only through ``mambavision.create_model`` and used only through the
backbone contract (DESIGN.md), so nothing here depends on the architecture. No xformers: the
student head runs once on the concatenated tokens, which is what DINOv2's block-diagonal
attention bias amounted to for a per-token MLP.
"""
import logging
from typing import Dict, List

import torch
from torch import nn

import mambavision
from dino import distributed
from dino import fsdp
from dino.configs.config import as_container
from dino.data.augmentations import normalize_uint8
from dino.data.photometric import apply_photometric
from dino.heads import DINOHead
from dino.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss
from dino.utils import precision
from mambavision.amp import autocast_off

logger = logging.getLogger("dino")


def backbone_kwargs(cfg, for_student: bool) -> Dict:
    """``create_model`` overrides from the config (teacher: no drop path)."""
    kwargs = dict(
        img_size=cfg.crops.global_crops_size,
        patch_size=cfg.student.patch_size,
        drop_path_rate=cfg.student.drop_path_rate if for_student else 0.0,
    )
    kwargs.update(as_container(cfg.student.model_kwargs) or {})
    return kwargs


def backbone_config(cfg) -> Dict:
    """What ``mambavision.load_pretrained`` needs to rebuild the teacher backbone: its name, its complete
    ``create_model`` config and its card as a plain dict, holding the input normalisation it was trained
    with (feature extraction defaults to it)."""
    kwargs = backbone_kwargs(cfg, for_student=False)
    kwargs.pop("drop_path_rate", None)
    card = mambavision.get_card(cfg.student.arch).with_normalization(
        cfg.augmentations.mean, cfg.augmentations.std, "training config (augmentations.mean/std)")
    return {"name": cfg.student.arch, "kwargs": {**mambavision.get_entry(cfg.student.arch).default_cfg, **kwargs},
            "card": card.to_dict()}


class SSLMetaArch(nn.Module):
    """Student and teacher ``ModuleDict``s with ``backbone``, ``dino_head`` and (separate) ``ibot_head``."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self._crop_stats = {}  # device -> (mean, std) tensors for uint8 crops (_crop_statistics)
        student_backbone = mambavision.create_model(cfg.student.arch, **backbone_kwargs(cfg, True))
        teacher_backbone = mambavision.create_model(cfg.student.arch, **backbone_kwargs(cfg, False))
        self.embed_dim = student_backbone.embed_dim

        self.do_dino = cfg.dino.loss_weight > 0
        self.do_koleo = cfg.dino.koleo_loss_weight > 0
        self.do_ibot = cfg.ibot.loss_weight > 0
        self.ibot_separate_head = cfg.ibot.separate_head

        def head(section):
            return DINOHead(
                in_dim=self.embed_dim,
                out_dim=section.head_n_prototypes,
                hidden_dim=section.head_hidden_dim,
                bottleneck_dim=section.head_bottleneck_dim,
                nlayers=section.head_nlayers,
            )

        student, teacher = {"backbone": student_backbone}, {"backbone": teacher_backbone}
        # The DINO head also serves iBOT when the iBOT head is shared (DINOv2's behaviour).
        student["dino_head"], teacher["dino_head"] = head(cfg.dino), head(cfg.dino)
        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes)
        self.koleo_loss = KoLeoLoss()
        if self.do_ibot:
            ibot_out = cfg.ibot.head_n_prototypes if self.ibot_separate_head else cfg.dino.head_n_prototypes
            self.ibot_patch_loss = iBOTPatchLoss(ibot_out)
            if self.ibot_separate_head:
                student["ibot_head"], teacher["ibot_head"] = head(cfg.ibot), head(cfg.ibot)
        self.student = nn.ModuleDict(student)
        self.teacher = nn.ModuleDict(teacher)
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.fp16_scaler = None
        self.device = torch.device("cpu")
        logger.info(
            "SSLMetaArch: %s (embed_dim %d), student %.2fM params, heads: %s",
            cfg.student.arch, self.embed_dim, sum(p.numel() for p in self.student.parameters()) / 1e6, list(student),
        )

    # -- setup ---------------------------------------------------------------------------------
    def prepare_for_distributed_training(self, device: torch.device) -> None:
        """Same weights on every rank, teacher = student, then shard with FSDP2 (any multi-process run; a single process stays plain)."""
        self.to(device)
        self.device = device
        if distributed.get_global_size() > 1:
            for t in self.student.state_dict().values():
                torch.distributed.broadcast(t, src=0)
        for k in self.student:
            self.teacher[k].load_state_dict(self.student[k].state_dict())
        if self.cfg.compute_precision.compile:
            mode = self.cfg.compute_precision.compile_mode
            if mode == "reduce-overhead" and distributed.get_global_size() > 1:
                # FSDP2 gathers the parameters into fresh memory at each forward; a CUDA graph records addresses.
                logger.warning("compute_precision.compile_mode=reduce-overhead was measured on one GPU only; "
                               "under FSDP2 (%d ranks) the CUDA graphs may re-record at every step",
                               distributed.get_global_size())
            self.student.backbone.compile_blocks(mode=mode)
            self.teacher.backbone.compile_blocks(mode=mode)
        for k in list(self.student):
            self.student[k] = fsdp.wrap_module(self.student[k], self.cfg.compute_precision.student[k], device)
            self.teacher[k] = fsdp.wrap_module(self.teacher[k], self.cfg.compute_precision.teacher[k], device)
        if self.cfg.compute_precision.grad_scaler and device.type == "cuda":
            self.fp16_scaler = fsdp.make_grad_scaler()

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # no drop path in the teacher
        return self

    def forward(self, inputs):
        raise NotImplementedError("use forward_backward(images, teacher_temp)")

    # -- one step ------------------------------------------------------------------------------
    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True)

    @torch.no_grad()
    def _teacher_targets(self, global_crops, n_global, teacher_temp, mask_indices, n_masked, n_masked_tensor, upperbound):
        out = self.teacher.backbone(global_crops, is_training=True)
        cls = out["x_norm_clstoken"].chunk(n_global)
        # Swap the two globals so that crop A's student output is matched to crop B's teacher.
        cls = torch.cat((cls[1], cls[0]))
        patches = out["x_norm_patchtokens"]
        n_cls = cls.shape[0]
        masked_after_head = None
        if self.do_ibot:
            dim = patches.shape[-1]
            masked = patches.flatten(0, 1).index_select(0, mask_indices)
            if self.ibot_separate_head:
                buf = patches.new_zeros(upperbound, dim)
                buf[:n_masked] = masked
                cls_after_head = self.teacher.dino_head(cls)
                masked_after_head = self.teacher.ibot_head(buf)[:n_masked]
            else:
                buf = patches.new_zeros(upperbound + n_cls, dim)
                buf[:n_cls] = cls
                buf[n_cls : n_cls + n_masked] = masked
                after = self.teacher.dino_head(buf)
                cls_after_head = after[:n_cls]
                masked_after_head = after[n_cls : n_cls + n_masked]
        else:
            cls_after_head = self.teacher.dino_head(cls)
        return cls_after_head, masked_after_head

    @torch.no_grad()
    def _center_teacher(self, cls_after_head, masked_after_head, n_global, teacher_temp, n_masked_tensor):
        # fp32 whatever the forward ran in: softmax over 65k prototypes and Sinkhorn-Knopp's exp.
        cls_after_head = cls_after_head.float()
        masked_after_head = masked_after_head.float() if masked_after_head is not None else None
        ibot_targets = None
        if self.cfg.train.centering == "softmax_center":
            dino_targets = self.dino_loss.softmax_center_teacher(cls_after_head, teacher_temp=teacher_temp)
            self.dino_loss.update_center(cls_after_head)
            if self.do_ibot:
                ibot_targets = self.ibot_patch_loss.softmax_center_teacher(
                    masked_after_head.unsqueeze(0), teacher_temp=teacher_temp
                ).squeeze(0)
                self.ibot_patch_loss.update_center(masked_after_head)
        else:  # sinkhorn_knopp (validated in the config)
            dino_targets = self.dino_loss.sinkhorn_knopp_teacher(cls_after_head, teacher_temp=teacher_temp)
            if self.do_ibot:
                ibot_targets = self.ibot_patch_loss.sinkhorn_knopp_teacher(
                    masked_after_head, teacher_temp=teacher_temp, n_masked_patches_tensor=n_masked_tensor
                )
        dino_targets = dino_targets.view(n_global, -1, *dino_targets.shape[1:])
        return dino_targets, ibot_targets

    def forward_backward(self, images: Dict, teacher_temp: float) -> Dict[str, torch.Tensor]:
        """One DINOv2 step on a collated batch: losses, backward (scaled under fp16). Returns the
        detached loss terms for display (``dino_local_crops_loss``, ``dino_global_crops_loss``,
        ``koleo_loss``, ``ibot_loss``). The forward passes run under ``compute_precision.autocast_dtype``,
        the centering and the losses in fp32."""
        if self.cfg.compute_precision.compile and self.cfg.compute_precision.compile_mode == "reduce-overhead":
            # A new step: the CUDA graphs may reuse the memory of the last step's outputs, which are dead now.
            torch.compiler.cudagraph_mark_step_begin()
        n_global = 2
        global_crops, local_crops, masks, mask_indices, n_masked, upperbound = self._batch(images)
        n_masked_tensor = self._to_device(images["n_masked_patches"])
        masks_weight = self._to_device(images["masks_weight"])

        amp = precision.autocast(self.cfg.compute_precision.autocast_dtype, self.device)
        with amp:
            teacher_out = self._teacher_targets(
                global_crops, n_global, teacher_temp, mask_indices, n_masked, n_masked_tensor, upperbound
            )
        with autocast_off(self.device.type):
            dino_targets, ibot_targets = self._center_teacher(*teacher_out, n_global, teacher_temp, n_masked_tensor)
        fsdp.reshard(self.teacher.values())  # the EMA must see the sharded teacher parameters

        with amp:
            student_out = self._student_forward(global_crops, local_crops, masks, mask_indices, n_masked, upperbound)
        with autocast_off(self.device.type):
            total, loss_dict = self._losses(*student_out, dino_targets, ibot_targets, masks, n_masked, masks_weight)
        if self.fp16_scaler is not None:
            self.fp16_scaler.scale(total).backward()
        else:
            total.backward()
        return {k: v.detach() for k, v in loss_dict.items()}

    def _batch(self, images: Dict):
        """The collated batch on this model's device: crops, masks, masked indices, their count, upper bound.
        uint8 crops (the trainer's loader) are normalised here, after the copy to the device."""
        n_local = self.cfg.crops.local_crops_number
        global_crops = self._crops(images["collated_global_crops"], images.get("collated_global_params"))
        local_crops = self._crops(images["collated_local_crops"], images.get("collated_local_params")) \
            if n_local > 0 else None
        masks = self._to_device(images["collated_masks"])
        mask_indices = self._to_device(images["mask_indices_list"])
        return global_crops, local_crops, masks, mask_indices, mask_indices.shape[0], int(images["upperbound"])

    def _crops(self, crops, photometric=None):
        crops = self._to_device(crops)
        if photometric is not None and crops.device.type != "meta":  # augmentations.on_device; no FLOPs to count
            crops = apply_photometric(crops, self._to_device(photometric),
                                      compile=bool(self.cfg.compute_precision.compile))
        if crops.dtype == torch.uint8:
            crops = normalize_uint8(crops, *self._crop_statistics(crops.device))
        return crops

    def _crop_statistics(self, device):
        # Made once per device: built from the config's lists at each step, they would be two host-to-device
        # copies from pageable memory per crop batch, each one waiting for the GPU queue.
        stats = self._crop_stats.get(device)
        if stats is None:
            aug = self.cfg.augmentations
            stats = self._crop_stats[device] = tuple(torch.tensor(list(v), dtype=torch.float32, device=device)
                                                     for v in (aug.mean, aug.std))
        return stats

    def run_networks(self, images: Dict) -> None:
        """The network passes of one step, without the losses: teacher forward, student forward, and a
        backward through the student from a stand-in scalar. The losses add no matrix products beyond
        KoLeo's tiny one, so this is what MFU counts (``dino.utils.throughput.count_step_flops``)."""
        global_crops, local_crops, masks, mask_indices, n_masked, upperbound = self._batch(images)
        self._teacher_targets(global_crops, 2, 0.07, mask_indices, n_masked, None, upperbound)
        outs = self._student_forward(global_crops, local_crops, masks, mask_indices, n_masked, upperbound)
        sum(o.sum() for o in outs if o is not None).backward()

    def _student_forward(self, global_crops, local_crops, masks, mask_indices, n_masked, upperbound):
        """Student backbone and heads; returns (local, global and masked-patch head outputs, global CLS)."""
        if local_crops is not None:
            s_global, s_local = self.student.backbone([global_crops, local_crops], masks=[masks, None], is_training=True)
        else:
            s_global = self.student.backbone(global_crops, masks=masks, is_training=True)
            s_local = None

        # Every token that goes through the student DINO head, in one call.
        head_inputs: List[torch.Tensor] = []
        if s_local is not None:
            head_inputs.append(s_local["x_norm_clstoken"])
        global_cls = s_global["x_norm_clstoken"]
        head_inputs.append(global_cls)
        masked_student = None
        if self.do_ibot:
            patches = s_global["x_norm_patchtokens"]
            buf = patches.new_zeros(upperbound, patches.shape[-1])
            buf[:n_masked] = patches.flatten(0, 1).index_select(0, mask_indices)
            if self.ibot_separate_head:
                masked_student = self.student.ibot_head(buf)[:n_masked]
            else:
                head_inputs.append(buf)
        sizes = [t.shape[0] for t in head_inputs]
        head_out = list(self.student.dino_head(torch.cat(head_inputs)).split(sizes))
        local_after_head = head_out.pop(0) if s_local is not None else None
        global_after_head = head_out.pop(0)
        if self.do_ibot and not self.ibot_separate_head:
            masked_student = head_out.pop(0)[:n_masked]
        return local_after_head, global_after_head, masked_student, global_cls

    def _losses(self, local_after_head, global_after_head, masked_student, global_cls,
                dino_targets, ibot_targets, masks, n_masked, masks_weight):
        """The weighted sum of the DINO, KoLeo and iBOT terms, in fp32, and the terms for display."""
        n_global, n_local = 2, self.cfg.crops.local_crops_number
        n_terms = max(n_local * n_global, 1) + (n_global - 1) * n_global
        as32 = lambda t: t.float() if t is not None else None  # noqa: E731
        local_after_head, global_after_head = as32(local_after_head), as32(global_after_head)
        masked_student, global_cls = as32(masked_student), as32(global_cls)
        loss_dict: Dict[str, torch.Tensor] = {}
        total = global_cls.new_zeros(())
        if self.do_dino:
            if local_after_head is not None:
                local_loss = self.dino_loss(list(local_after_head.chunk(n_local)), list(dino_targets)) / n_terms
                loss_dict["dino_local_crops_loss"] = local_loss
                total = total + self.cfg.dino.loss_weight * local_loss
            # Both globals in one pair (targets were swapped), so the term counts twice.
            global_loss = self.dino_loss([global_after_head], [dino_targets.flatten(0, 1)]) * 2 / n_terms
            loss_dict["dino_global_crops_loss"] = global_loss
            total = total + self.cfg.dino.loss_weight * global_loss
        if self.do_koleo:
            # Per global crop: never between the two crops of one image.
            koleo = self.cfg.dino.koleo_loss_weight * sum(self.koleo_loss(c) for c in global_cls.chunk(n_global))
            total = total + koleo
            loss_dict["koleo_loss"] = koleo / 2  # DINOv2 displays it per crop
        if self.do_ibot:
            ibot = self.ibot_patch_loss.forward_masked(
                masked_student, ibot_targets, student_masks_flat=masks, n_masked_patches=n_masked, masks_weight=masks_weight
            ) * 2 / n_global
            loss_dict["ibot_loss"] = ibot / 2
            total = total + self.cfg.ibot.loss_weight * ibot
        return total, loss_dict

    # -- teacher -------------------------------------------------------------------------------
    @torch.no_grad()
    def update_teacher(self, m: float) -> None:
        """teacher <- m * teacher + (1 - m) * student, on the local shards (one-to-one under FSDP2)."""
        s_list, t_list = [], []
        for k in self.student:
            sp = [fsdp.local_tensor(p) for p in self.student[k].parameters()]
            tp = [fsdp.local_tensor(p) for p in self.teacher[k].parameters()]
            if len(sp) != len(tp) or any(a.shape != b.shape for a, b in zip(sp, tp)):
                raise RuntimeError(f"student and teacher {k} are not sharded alike; cannot update the teacher")
            s_list += sp
            t_list += tp
        torch._foreach_mul_(t_list, m)
        torch._foreach_add_(t_list, s_list, alpha=1 - m)

    # -- optimiser -----------------------------------------------------------------------------
    def get_params_groups(self) -> List[Dict]:
        """Fused AdamW groups per student sub-network (lr/wd multipliers, ``is_last_layer``)."""
        from dino.utils.param_groups import fuse_params_groups, get_params_groups_with_decay

        groups = []
        for m in self.student.values():
            groups += fuse_params_groups(
                get_params_groups_with_decay(
                    model=m,
                    lr_decay_rate=self.cfg.optim.layerwise_decay,
                    patch_embed_lr_mult=self.cfg.optim.patch_embed_lr_mult,
                )
            )
        return groups

    def flush_pending_state(self) -> None:
        """Fold pending (asynchronous) centre updates into the buffers before a checkpoint."""
        self.dino_loss.apply_center_update()
        if self.do_ibot:
            self.ibot_patch_loss.apply_center_update()
