"""torch.hub's entry points, as facebookresearch/deit's hubconf.py has them: every model of model.py by name,

    model = torch.hub.load("<owner>/<repo>", "deit_small_patch16_224", pretrained=True)

pretrained=True loads DeiT's released weights of that name (model.RELEASES); keyword arguments are DeiTConfig's."""

from model import MODELS, create_model

dependencies = ["torch"]


def _entry(name):
    def entry(pretrained=False, **overrides):
        return create_model(name, pretrained=pretrained, **overrides)
    entry.__name__, entry.__doc__ = name, f"{name} of model.py; pretrained=True: DeiT's released weights"
    return entry


globals().update({name: _entry(name) for name in MODELS})
