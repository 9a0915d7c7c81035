"""tskd.models."""

from tskd.models.sam import SAM_ARCHS, SamArchSpec, SamSegmenter, TeacherOutput, build_sam, save_sam_checkpoint
