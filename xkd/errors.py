class UserError(Exception):
    """A problem with the user's input: printed as one line, no traceback, exit status 2."""


def require_file(path, flag, missing_hint=''):
    """A UserError unless `path` is an existing file: a folder gets the checkpoint files in it named."""
    import os
    if os.path.isdir(path):
        inside = sorted(name for name in os.listdir(path) if name.endswith(('.pth', '.pth.tar', '.pt', '.safetensors')))
        hint = (f"; it holds {', '.join(inside[:6])}" + (' ...' if len(inside) > 6 else '')) if inside else ''
        raise UserError(f"{flag} '{path}' is a folder, not a checkpoint file: give the file inside it "
                        f"(e.g. {os.path.join(path, 'last.pth.tar')}){hint}")
    if not os.path.isfile(path):
        raise UserError(f"{flag} '{path}' does not exist{missing_hint}")
