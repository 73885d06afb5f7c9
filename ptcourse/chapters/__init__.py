"""Each chapter's own helpers, in a module named like its notebook.

=====================================  ===============================================
notebook                               helpers
=====================================  ===============================================
``01_autoencoders``                    (none: the chapter builds everything in the notebook)
``02_contrastive_learning``            batched per-image augmentation, a CIFAR ResNet
``03_bert_finetuning``                 tokenised datasets, dynamic padding, length grouping, MLM masking
``04_resnet_transfer``                 ImageNet weights, partial freezing, discriminative LRs, Grad-CAM
``05_knowledge_distillation``          small students, latency, quantization
=====================================  ===============================================

Example:
    >>> from ptcourse.chapters.bert_finetuning import pad_collate
"""
