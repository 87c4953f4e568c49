"""The Context of the latest ``init()``: kept here, apart from
``process_group``, so that the failure hook (which reads it when a rank
fails) and the deadlines (which end the job through that hook) import no
module that imports them."""
_context = None


def get():
    """The Context made by the latest ``init()`` (set by process_group)."""
    return _context


def set(ctx):  # noqa: A001 - the module is only ever used as current.set
    global _context
    _context = ctx
