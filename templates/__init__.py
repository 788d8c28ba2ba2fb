"""propgen's templates: adjoints of torch ops (ops, nn), propagator template pairs
(propagators) and the estimator arithmetic they call (estimators).

Each module here is plain Python meant to be read as documentation of the math.  The
registry collects the templates from the modules listed in TEMPLATE_MODULES.
"""

TEMPLATE_MODULES = (
    "propgen.templates.ops",
    "propgen.templates.nn",
    "propgen.templates.tangents",
    "propgen.templates.tangents_structure",
    "propgen.templates.nn_tangents",
    "propgen.templates.helper_tangents",
)
