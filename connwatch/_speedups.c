/* connwatch._speedups: the C version of the hot path (call-site walk, registry events).
 * Optional: connwatch/_registry.py and connwatch/_callsite.py fall back to pure Python when
 * this module is missing or CONNWATCH_PURE_PYTHON=1. Work in progress. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT, "connwatch._speedups", "C hot path of connwatch.", -1, NULL,
};

PyMODINIT_FUNC PyInit__speedups(void) { return PyModule_Create(&speedups_module); }
