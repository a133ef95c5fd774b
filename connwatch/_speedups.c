/* connwatch._speedups: the hot path in C (call-site walk and registry).
 *
 * A line-for-line port of the pure-Python code in connwatch/_callsite.py (find) and
 * connwatch/_registry.py (the _Ref and _Stat types, track/release/set_role, the event drain).
 * Same data, same events, same locking protocol: the Python module owns the containers (the
 * event deque, the stats and totals) and hands them over with bind()/bind_callsite(); the Python
 * code that is not hot (reads under the lock, reservations, fork, clear) keeps working on them
 * unchanged. Optional: without this module (no compiler, or CONNWATCH_PURE_PYTHON=1) the
 * Python versions run, with the same behaviour.
 *
 * Rules kept from the Python version:
 *   - track/release/set_role and the weakref callback only append events (deque.append is
 *     atomic under the GIL); events are applied by drain(), called by Python with the registry
 *     lock held and _busy set.
 *   - Any allocation of a GC-tracked object may run the cyclic GC, hence finalizers (which may
 *     close sockets, i.e. call release() on this thread, or switch threads): the state touched
 *     around allocations is kept consistent, and _add marks the ref (APPLYING) before reading the
 *     wanted role, exactly like the Python code.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "structmember.h"
#include <time.h>
#include <math.h>
#if PY_VERSION_HEX < 0x030b0000
#include "frameobject.h" /* PyFrameObject's fields and PyFrame_GetBack before 3.11 */
#endif

#if PY_VERSION_HEX < 0x03090000 || PY_VERSION_HEX >= 0x030e0000 || defined(Py_GIL_DISABLED)
/* The weakref lists and frames below are read as CPython 3.9-3.13 (with the GIL) lay them out;
   elsewhere the build hook leaves this module out and the Python path runs. */
#error "connwatch._speedups supports CPython 3.9 to 3.13 with the GIL"
#endif

/* ------------------------------------------------------------------------------------------ */
/* module state (single-phase init: one interpreter)                                          */

static PyObject *ev_append;      /* _events.append */
static PyObject *ev_popleft;     /* _events.popleft */
static PyObject *events;         /* the deque */
static PyObject *stats;          /* (kind, role, id(site)) -> Stat */
static PyObject *totals;         /* [live, live counting toward caps] */
static PyObject *site_stats;     /* id(site) -> [Stat, ...] (grown when a stat is made) */
static PyObject *up_counts;      /* upstream -> [[live, created], ...] (grown with them) */
static PyObject *res_total;      /* [reserved] */
static PyObject *res_site;       /* id(site) -> reserved */
static PyObject *res_up;         /* upstream -> reserved */
static PyObject *flush_fn;       /* _registry.flush */
static PyObject *report_fn;      /* _registry._c_error(where, exc) */
static PyObject *reg_globals;    /* _registry.__dict__ (for on_track) */
static PyObject *monotonic_fn;   /* time.monotonic (non-Linux) */
static PyObject *on_collected;   /* the weakref callback (a C function object) */
static PyObject *APPLYING;       /* marker: a ref whose track event is being applied */
static PyObject *tags[6];        /* the ints EV_TRACK..EV_UNRESERVE */
static Py_ssize_t batch = 256;

static PyObject *s_on_track, *s_socket, *s_client, *s_role, *s_upstream, *s_reservation;

enum { EV_TRACK = 0, EV_RELEASE, EV_GC, EV_ROLE, EV_TRANSFER, EV_UNRESERVE };

#define NN(x) ((x) == Py_None ? NULL : (x)) /* None and NULL both mean "no value" */

/* ------------------------------------------------------------------------------------------ */
/* Stat                                                                                       */

/* Lifetimes of released clients per stat: NLIFE buckets, factor 2 apart, bucket LIFE_AT_10S
   starting at 10 s (bucket 0: under 0.6 ms; the last: 85 minutes and more). The same in
   _registry.py (LIFE_BUCKETS, _life_bucket). */
#define NLIFE 24
#define LIFE_AT_10S 15

typedef struct {
    PyObject_HEAD
    PyObject *kind, *role, *site, *head, *tail, *upstreams, *lives;
    Py_ssize_t live, created, gc_released;
    double first; /* monotonic time the stat was made */
    char cap;
} StatObject;

static PyTypeObject StatType;

static int stat_traverse(StatObject *s, visitproc visit, void *arg) {
    Py_VISIT(s->kind); Py_VISIT(s->role); Py_VISIT(s->site);
    Py_VISIT(s->head); Py_VISIT(s->tail); Py_VISIT(s->upstreams); Py_VISIT(s->lives);
    return 0;
}

static int stat_clear(StatObject *s) {
    Py_CLEAR(s->kind); Py_CLEAR(s->role); Py_CLEAR(s->site);
    Py_CLEAR(s->head); Py_CLEAR(s->tail); Py_CLEAR(s->upstreams); Py_CLEAR(s->lives);
    return 0;
}

static void stat_dealloc(StatObject *s) {
    PyObject_GC_UnTrack(s);
    stat_clear(s);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static int counts_toward_cap(PyObject *kind, PyObject *role) {
    if (!PyUnicode_Check(kind) || PyUnicode_Compare(kind, s_socket) != 0) return 1;
    return role != NULL && role != Py_None && PyUnicode_Check(role) && PyUnicode_Compare(role, s_client) == 0;
}

static double monotonic(void);

static PyObject *stat_create(PyObject *kind, PyObject *role, PyObject *site) {
    StatObject *s = PyObject_GC_New(StatObject, &StatType);
    if (s == NULL) return NULL;
    s->kind = s->role = s->site = s->head = s->tail = s->lives = NULL;
    s->upstreams = PyDict_New();
    if (s->upstreams == NULL) { Py_DECREF(s); return NULL; }
    s->lives = PyList_New(NLIFE);
    if (s->lives == NULL) { Py_DECREF(s); return NULL; }
    for (Py_ssize_t i = 0; i < NLIFE; i++) {
        PyObject *zero = PyLong_FromLong(0);
        if (zero == NULL) { Py_DECREF(s); return NULL; }
        PyList_SET_ITEM(s->lives, i, zero);
    }
    s->first = monotonic();
    Py_INCREF(kind); s->kind = kind;
    if (role == NULL) role = Py_None;
    Py_INCREF(role); s->role = role;
    Py_INCREF(site); s->site = site;
    s->head = s->tail = NULL;
    s->live = s->created = s->gc_released = 0;
    s->cap = (char)counts_toward_cap(kind, role);
    PyObject_GC_Track(s);
    return (PyObject *)s;
}

static PyObject *stat_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *kind, *role, *site;
    static char *names[] = {"kind", "role", "site", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO", names, &kind, &role, &site)) return NULL;
    return stat_create(kind, role, site);
}

static PyMemberDef stat_members[] = {
    {"kind", T_OBJECT, offsetof(StatObject, kind), 0, NULL},
    {"role", T_OBJECT, offsetof(StatObject, role), 0, NULL},
    {"site", T_OBJECT, offsetof(StatObject, site), 0, NULL},
    {"cap", T_BOOL, offsetof(StatObject, cap), 0, NULL},
    {"head", T_OBJECT, offsetof(StatObject, head), 0, NULL},
    {"tail", T_OBJECT, offsetof(StatObject, tail), 0, NULL},
    {"live", T_PYSSIZET, offsetof(StatObject, live), 0, NULL},
    {"created", T_PYSSIZET, offsetof(StatObject, created), 0, NULL},
    {"gc_released", T_PYSSIZET, offsetof(StatObject, gc_released), 0, NULL},
    {"upstreams", T_OBJECT, offsetof(StatObject, upstreams), 0, NULL},
    {"lives", T_OBJECT, offsetof(StatObject, lives), READONLY, NULL},
    {"first", T_DOUBLE, offsetof(StatObject, first), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject StatType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "connwatch._speedups.Stat",
    .tp_basicsize = sizeof(StatObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Counts for one (kind, role, call site), and its live refs as a linked list.",
    .tp_traverse = (traverseproc)stat_traverse,
    .tp_clear = (inquiry)stat_clear,
    .tp_dealloc = (destructor)stat_dealloc,
    .tp_members = stat_members,
    .tp_new = stat_new,
};

/* ------------------------------------------------------------------------------------------ */
/* Ref: a weakref.ref subclass with the registry's fields                                     */

typedef struct {
    PyWeakReference wr;
    double born;
    char closed;
    float life; /* seconds from born to the close or collection (set then); 0: not yet. In the
                   padding after `closed`: it costs no memory. */
    PyObject *next, *prev, *stat, *upstream, *want_role, *want_up;
} RefObject;

static PyTypeObject RefType;
#define Ref_Check(o) (Py_TYPE(o) == &RefType)

static int ref_traverse(RefObject *r, visitproc visit, void *arg) {
    Py_VISIT(r->next); Py_VISIT(r->prev); Py_VISIT(r->stat);
    Py_VISIT(r->upstream); Py_VISIT(r->want_role); Py_VISIT(r->want_up);
    return _PyWeakref_RefType.tp_traverse((PyObject *)r, visit, arg);
}

static int ref_clear_fields(RefObject *r) {
    Py_CLEAR(r->next); Py_CLEAR(r->prev); Py_CLEAR(r->stat);
    Py_CLEAR(r->upstream); Py_CLEAR(r->want_role); Py_CLEAR(r->want_up);
    return 0;
}

static int ref_clear(RefObject *r) {
    ref_clear_fields(r);
    return _PyWeakref_RefType.tp_clear((PyObject *)r);
}

static void ref_dealloc(RefObject *r) {
    PyObject_GC_UnTrack(r);
    if (r->next == NULL && r->prev == NULL) { /* the usual case: released, unlinked */
        ref_clear_fields(r);
        _PyWeakref_RefType.tp_dealloc((PyObject *)r);
        return;
    }
    /* Still linked (the GC breaking a list): a long chain must not recurse without bound. */
    Py_TRASHCAN_BEGIN(r, ref_dealloc)
    ref_clear_fields(r);
    _PyWeakref_RefType.tp_dealloc((PyObject *)r);
    Py_TRASHCAN_END
}

static PyMemberDef ref_members[] = {
    {"born", T_DOUBLE, offsetof(RefObject, born), 0, NULL},
    {"closed", T_BOOL, offsetof(RefObject, closed), 0, NULL},
    {"life", T_FLOAT, offsetof(RefObject, life), 0, NULL},
    {"next", T_OBJECT, offsetof(RefObject, next), 0, NULL},
    {"prev", T_OBJECT, offsetof(RefObject, prev), 0, NULL},
    {"stat", T_OBJECT, offsetof(RefObject, stat), 0, NULL},
    {"upstream", T_OBJECT, offsetof(RefObject, upstream), 0, NULL},
    {"want_role", T_OBJECT, offsetof(RefObject, want_role), 0, NULL},
    {"want_up", T_OBJECT, offsetof(RefObject, want_up), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject RefType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "connwatch._speedups.Ref",
    .tp_basicsize = sizeof(RefObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The registry's weak reference to one tracked object.",
    .tp_traverse = (traverseproc)ref_traverse,
    .tp_clear = (inquiry)ref_clear,
    .tp_dealloc = (destructor)ref_dealloc,
    .tp_members = ref_members,
};

/* Set a field to a new (borrowed) value, normalising None to NULL. */
#define SETF(field, value) do { PyObject *_v = NN(value); Py_XINCREF(_v); Py_XSETREF(field, _v); } while (0)

static PyObject *new_ref(PyObject *obj) {
    PyObject *args = PyTuple_Pack(2, obj, on_collected);
    if (args == NULL) return NULL;
    /* weakref.__new__ allocates our (zeroed) subtype and links it into obj's weakref list;
       weakref.__init__ only re-checks the arguments, so it is not called. */
    PyObject *ref = RefType.tp_new(&RefType, args, NULL);
    Py_DECREF(args);
    return ref;
}

static double monotonic(void) {
#ifdef __linux__
    struct timespec ts; /* what time.monotonic() reads on Linux */
    if (clock_gettime(CLOCK_MONOTONIC, &ts) == 0) return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
#endif
    PyObject *v = PyObject_CallNoArgs(monotonic_fn);
    if (v == NULL) { PyErr_Clear(); return 0.0; }
    double d = PyFloat_AsDouble(v);
    Py_DECREF(v);
    if (d == -1.0 && PyErr_Occurred()) { PyErr_Clear(); return 0.0; }
    return d;
}

/* The head of obj's list of weak references (borrowed), or NULL. Only read with the GIL held
   and no Python code running, so the list cannot change under us. */
static PyWeakReference *weakrefs_of(PyObject *obj) {
    if (Py_TYPE(obj)->tp_weaklistoffset == 0) return NULL;
    return (PyWeakReference *)*PyObject_GET_WEAKREFS_LISTPTR(obj);
}

/* obj's live (not released) Ref: borrowed, or NULL. */
static RefObject *ref_of(PyObject *obj) {
    for (PyWeakReference *r = weakrefs_of(obj); r != NULL; r = r->wr_next) {
        if (Ref_Check((PyObject *)r) && !((RefObject *)r)->closed) return (RefObject *)r;
    }
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* helpers                                                                                    */

static int queue(PyObject *ev) {
    if (ev == NULL) return -1;
    PyObject *r = PyObject_CallOneArg(ev_append, ev);
    Py_DECREF(ev);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

static int maybe_flush(void) {
    if (PyObject_Size(events) > batch) {
        PyObject *r = PyObject_CallNoArgs(flush_fn);
        if (r == NULL) return -1;
        Py_DECREF(r);
    }
    return 0;
}

/* d[key] += delta; dropped once it is no longer positive (as the Python code does). */
static int dict_add(PyObject *d, PyObject *key, Py_ssize_t delta) {
    PyObject *cur = PyDict_GetItemWithError(d, key);
    Py_ssize_t n = 0;
    if (cur != NULL) {
        n = PyLong_AsSsize_t(cur);
        if (n == -1 && PyErr_Occurred()) return -1;
    } else if (PyErr_Occurred()) {
        return -1;
    }
    n += delta;
    if (n > 0) {
        PyObject *v = PyLong_FromSsize_t(n);
        if (v == NULL) return -1;
        int rc = PyDict_SetItem(d, key, v);
        Py_DECREF(v);
        return rc;
    }
    if (cur != NULL && PyDict_DelItem(d, key) < 0) return -1;
    return 0;
}

/* list[i] += delta */
static int list_add(PyObject *list, Py_ssize_t i, Py_ssize_t delta) {
    PyObject *cur = PyList_GetItem(list, i);
    if (cur == NULL) return -1;
    Py_ssize_t n = PyLong_AsSsize_t(cur);
    if (n == -1 && PyErr_Occurred()) return -1;
    PyObject *v = PyLong_FromSsize_t(n + delta);
    if (v == NULL) return -1;
    return PyList_SetItem(list, i, v); /* steals v */
}

/* d.setdefault(key, []).append(item) */
static int index_append(PyObject *d, PyObject *key, PyObject *item) {
    PyObject *list = PyDict_GetItemWithError(d, key);
    if (list == NULL) {
        if (PyErr_Occurred()) return -1;
        list = PyList_New(0);
        if (list == NULL) return -1;
        int rc = PyDict_SetItem(d, key, list);
        Py_DECREF(list);
        if (rc < 0) return -1;
    }
    return PyList_Append(list, item);
}

static int site_add(PyObject *d, PyObject *site, Py_ssize_t delta) {
    PyObject *sid = PyLong_FromVoidPtr(site); /* == id(site) */
    if (sid == NULL) return -1;
    int rc = dict_add(d, sid, delta);
    Py_DECREF(sid);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* the operations (lock held, _busy set)                                                      */

static int consume(PyObject *res) {
    if (!PyTuple_Check(res) || PyTuple_GET_SIZE(res) != 2) {
        PyErr_SetString(PyExc_TypeError, "bad reservation");
        return -1;
    }
    PyObject *site = PyTuple_GET_ITEM(res, 0), *up = PyTuple_GET_ITEM(res, 1);
    if (list_add(res_total, 0, -1) < 0) return -1;
    if (site_add(res_site, site, -1) < 0) return -1;
    if (up != Py_None && dict_add(res_up, up, -1) < 0) return -1;
    return 0;
}

/* (kind, role, site) -> Stat, by identity, in front of the stats dict (whose keys are tuples:
   building and hashing one costs more than the rest of add). Direct-mapped; cleared with the
   registry (clear_caches). Entries hold strong references. */
#define STAT_CACHE 256
typedef struct { PyObject *kind, *role, *site, *stat; } StatEntry;
static StatEntry stat_cache[STAT_CACHE];

static StatEntry *stat_slot(PyObject *kind, PyObject *role, PyObject *site) {
    uintptr_t h = ((uintptr_t)site >> 4) * 0x9E3779B1u ^ ((uintptr_t)role >> 4) * 31u ^ ((uintptr_t)kind >> 4);
    return &stat_cache[(h ^ (h >> 11)) & (STAT_CACHE - 1)];
}

static void clear_stat_cache(void) {
    for (int i = 0; i < STAT_CACHE; i++) {
        StatEntry *e = &stat_cache[i];
        PyObject *a = e->kind, *b = e->role, *c = e->site, *d = e->stat;
        e->kind = e->role = e->site = e->stat = NULL;
        Py_XDECREF(a); Py_XDECREF(b); Py_XDECREF(c); Py_XDECREF(d);
    }
}

static int add(RefObject *ref, PyObject *kind, PyObject *site, PyObject *res) {
    if (res != NULL && res != Py_None && consume(res) < 0) return -1;
    if (NN(ref->stat) != NULL) return 0;
    /* Mark the ref before reading the wanted role: a set_role() racing with us (from a thread
       switch inside the GC, below) either wrote before our read or sees the mark and queues
       a role event, applied after this one. */
    SETF(ref->stat, APPLYING);
    PyObject *role = NN(ref->want_role) ? NN(ref->want_role) : Py_None;
    PyObject *up = NN(ref->want_up);
    Py_INCREF(role);
    Py_XINCREF(up);
    int rc = -1;
    PyObject *stat = NULL, *key = NULL, *sid = NULL;
    StatEntry *e = stat_slot(kind, role, site);
    if (e->stat != NULL && e->kind == kind && e->role == role && e->site == site) {
        stat = e->stat;
        Py_INCREF(stat);
    } else {
        sid = PyLong_FromVoidPtr(site);
        if (sid == NULL) goto done;
        key = PyTuple_Pack(3, kind, role, sid);
        if (key == NULL) goto done;
        stat = PyDict_GetItemWithError(stats, key);
        if (stat != NULL) {
            Py_INCREF(stat);
        } else {
            if (PyErr_Occurred()) goto done;
            stat = stat_create(kind, role, site);
            if (stat == NULL || PyDict_SetItem(stats, key, stat) < 0) goto done;
            if (index_append(site_stats, sid, stat) < 0) goto done;
        }
        e = stat_slot(kind, role, site); /* (the GC may have run: recompute nothing, just refill) */
        PyObject *ok = e->kind, *orole = e->role, *osite = e->site, *ostat = e->stat;
        Py_INCREF(kind); Py_INCREF(role); Py_INCREF(site); Py_INCREF(stat);
        e->kind = kind; e->role = role; e->site = site; e->stat = stat;
        Py_XDECREF(ok); Py_XDECREF(orole); Py_XDECREF(osite); Py_XDECREF(ostat);
    }
    StatObject *s = (StatObject *)stat;
    /* From here on nothing allocates a GC object until the links are consistent. */
    SETF(ref->stat, stat);
    SETF(ref->upstream, up);
    PyObject *tail = NN(s->tail);
    SETF(ref->prev, tail);
    Py_CLEAR(ref->next);
    if (tail == NULL) {
        SETF(s->head, (PyObject *)ref);
    } else {
        SETF(((RefObject *)tail)->next, (PyObject *)ref);
    }
    SETF(s->tail, (PyObject *)ref);
    s->live++;
    s->created++;
    if (list_add(totals, 0, 1) < 0) goto done;
    if (s->cap && list_add(totals, 1, 1) < 0) goto done;
    if (up != NULL) {
        PyObject *u = PyDict_GetItemWithError(s->upstreams, up);
        if (u == NULL) {
            if (PyErr_Occurred()) goto done;
            u = Py_BuildValue("[nn]", (Py_ssize_t)1, (Py_ssize_t)1);
            if (u == NULL) goto done;
            int r2 = PyDict_SetItem(s->upstreams, up, u);
            if (r2 == 0) r2 = index_append(up_counts, up, u);
            Py_DECREF(u);
            if (r2 < 0) goto done;
        } else if (list_add(u, 0, 1) < 0 || list_add(u, 1, 1) < 0) {
            goto done;
        }
    }
    rc = 0;
done:
    if (rc < 0 && ref->stat == APPLYING) Py_CLEAR(ref->stat);
    Py_XDECREF(stat);
    Py_XDECREF(key);
    Py_XDECREF(sid);
    Py_DECREF(role);
    Py_XDECREF(up);
    return rc;
}

/* The lifetime bucket of a released ref (its life was set at the close or collection; a ref
   released some other way, e.g. by clear(), is measured now). */
static Py_ssize_t life_bucket(RefObject *ref) {
    double life = ref->life > 0.0f ? (double)ref->life : monotonic() - ref->born;
    if (!(life > 0.0)) return 0;
    int e;
    frexp(life / 10.0, &e); /* life/10 = m * 2^e, m in [0.5, 1): floor(log2(life/10)) = e - 1 */
    long b = (long)e - 1 + LIFE_AT_10S;
    return b < 0 ? 0 : b >= NLIFE ? NLIFE - 1 : b;
}

/* Drop ref; uncount undoes its creation instead of counting a close. */
static int remove_ref(RefObject *ref, int collected, int uncount) {
    PyObject *stat = NN(ref->stat);
    if (stat == NULL || stat == APPLYING) return 0;
    StatObject *s = (StatObject *)stat;
    /* Take the fields over (we own these references now). */
    ref->stat = NULL;
    PyObject *prev = NN(ref->prev), *nxt = NN(ref->next);
    if (prev == NULL) Py_XDECREF(ref->prev);
    if (nxt == NULL) Py_XDECREF(ref->next);
    ref->prev = ref->next = NULL;
    if (prev == NULL) {
        SETF(s->head, nxt);
    } else {
        SETF(((RefObject *)prev)->next, nxt);
    }
    if (nxt == NULL) {
        SETF(s->tail, prev);
    } else {
        SETF(((RefObject *)nxt)->prev, prev);
    }
    s->live--;
    int rc = -1;
    if (list_add(totals, 0, -1) < 0) goto done;
    if (uncount) s->created--;
    else if (collected) s->gc_released++;
    if (!uncount && s->lives != NULL && list_add(s->lives, life_bucket(ref), 1) < 0) goto done;
    if (s->cap && list_add(totals, 1, -1) < 0) goto done;
    PyObject *up = NN(ref->upstream);
    if (up != NULL) {
        PyObject *u = PyDict_GetItemWithError(s->upstreams, up);
        if (u != NULL) {
            if (list_add(u, 0, -1) < 0) goto done;
            if (uncount && list_add(u, 1, -1) < 0) goto done;
        } else if (PyErr_Occurred()) {
            goto done;
        }
    }
    rc = 0;
done:
    Py_XDECREF(prev);
    Py_XDECREF(nxt);
    Py_DECREF(stat);
    return rc;
}

static int same(PyObject *a, PyObject *b) {
    a = NN(a); b = NN(b);
    if (a == b) return 1;
    if (a == NULL || b == NULL) return 0;
    return PyObject_RichCompareBool(a, b, Py_EQ);
}

static int set_role_op(RefObject *ref, PyObject *res) {
    PyObject *stat = NN(ref->stat);
    int unchanged = 1;
    if (stat != NULL && stat != APPLYING) {
        int a = same(((StatObject *)stat)->role, ref->want_role);
        if (a < 0) return -1;
        int b = a ? same(ref->upstream, ref->want_up) : 0;
        if (b < 0) return -1;
        unchanged = a && b;
    }
    if (unchanged) {
        if (res != NULL && res != Py_None) return consume(res);
        return 0;
    }
    Py_INCREF(stat);
    StatObject *s = (StatObject *)stat;
    PyObject *kind = s->kind, *site = s->site;
    Py_INCREF(kind);
    Py_INCREF(site);
    int rc = remove_ref(ref, 0, 1);
    if (rc == 0) rc = add(ref, kind, site, res);
    Py_DECREF(kind);
    Py_DECREF(site);
    Py_DECREF(stat);
    return rc;
}

static int transfer_op(RefObject *old, RefObject *new) {
    PyObject *stat = NN(old->stat);
    if (stat == NULL || stat == APPLYING) return 0;
    Py_INCREF(stat);
    StatObject *s = (StatObject *)stat;
    int rc = -1;
#if PY_VERSION_HEX >= 0x030d0000
    PyObject *obj;
    if (PyWeakref_GetRef((PyObject *)new, &obj) < 0) goto done;
    if (obj != NULL) {
#else
    PyObject *obj = PyWeakref_GetObject((PyObject *)new); /* borrowed */
    if (obj == NULL) goto done;
    if (obj != Py_None) {
        Py_INCREF(obj);
#endif
        RefObject *cur = NULL;
        for (PyWeakReference *r = weakrefs_of(obj); r != NULL; r = r->wr_next) {
            RefObject *c = (RefObject *)r;
            if (Ref_Check((PyObject *)r) && c != new && NN(c->stat) != NULL) { cur = c; break; }
        }
        int r2 = 0;
        if (cur != NULL) {
            Py_INCREF(cur);
            r2 = remove_ref(cur, 0, 1); /* the new object was counted on its own: undo that */
            Py_DECREF(cur);
        }
        Py_DECREF(obj);
        if (r2 < 0) goto done;
    }
    new->born = old->born;
    SETF(new->want_role, s->role);
    SETF(new->want_up, old->upstream);
    if (remove_ref(old, 0, 1) < 0) goto done;
    rc = add(new, s->kind, s->site, NULL);
done:
    Py_DECREF(stat);
    return rc;
}

static int apply(PyObject *op) {
    if (!PyTuple_Check(op) || PyTuple_GET_SIZE(op) < 2) {
        PyErr_SetString(PyExc_TypeError, "bad registry event");
        return -1;
    }
    long tag = PyLong_AsLong(PyTuple_GET_ITEM(op, 0));
    PyObject *a = PyTuple_GET_ITEM(op, 1);
    Py_ssize_t n = PyTuple_GET_SIZE(op);
    switch (tag) {
    case EV_TRACK:
        if (n < 5 || !Ref_Check(a)) break;
        return add((RefObject *)a, PyTuple_GET_ITEM(op, 2), PyTuple_GET_ITEM(op, 3), PyTuple_GET_ITEM(op, 4));
    case EV_RELEASE:
        if (!Ref_Check(a)) break;
        return remove_ref((RefObject *)a, 0, 0);
    case EV_GC:
        if (!Ref_Check(a)) break;
        return remove_ref((RefObject *)a, 1, 0);
    case EV_ROLE:
        if (n < 3 || !Ref_Check(a)) break;
        return set_role_op((RefObject *)a, PyTuple_GET_ITEM(op, 2));
    case EV_TRANSFER:
        if (n < 3 || !Ref_Check(a) || !Ref_Check(PyTuple_GET_ITEM(op, 2))) break;
        return transfer_op((RefObject *)a, (RefObject *)PyTuple_GET_ITEM(op, 2));
    case EV_UNRESERVE:
        return consume(a);
    default:
        if (tag == -1 && PyErr_Occurred()) return -1;
    }
    PyErr_SetString(PyExc_TypeError, "bad registry event");
    return -1;
}

/* Report the exception being raised as an internal error of `where` (a str), and clear it. */
static void report_obj(PyObject *where) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value != NULL && tb != NULL) PyException_SetTraceback(value, tb);
    PyObject *r = PyObject_CallFunctionObjArgs(report_fn, where, value ? value : Py_None, NULL);
    if (r == NULL) PyErr_Clear();
    Py_XDECREF(r);
    Py_XDECREF(type); Py_XDECREF(value); Py_XDECREF(tb);
}

static void report(const char *where) {
    PyObject *w = PyUnicode_FromString(where);
    if (w == NULL) { PyErr_Clear(); return; } /* (the original error is dropped with it) */
    report_obj(w);
    Py_DECREF(w);
}

/* ------------------------------------------------------------------------------------------ */
/* Python-visible functions                                                                   */

static PyObject *sp_drain(PyObject *self, PyObject *unused) {
    /* Apply the queued events (lock held, _busy set), including those queued meanwhile. */
    while (PyObject_Size(events) > 0) {
        PyObject *op = PyObject_CallNoArgs(ev_popleft);
        if (op == NULL) {
            if (PyErr_ExceptionMatches(PyExc_IndexError)) { PyErr_Clear(); break; } /* emptied meanwhile */
            return NULL;
        }
        if (apply(op) < 0) {
            if (!PyErr_ExceptionMatches(PyExc_Exception)) { Py_DECREF(op); return NULL; }
            report("the registry");
        }
        Py_DECREF(op);
    }
    Py_RETURN_NONE;
}

static PyObject *sp_on_collected(PyObject *self, PyObject *ref) {
    /* Runs inside the GC, maybe while this thread drains: only append. A ref whose release is
       queued already (closed, then dropped) needs no second event. */
    if (Ref_Check(ref) && !((RefObject *)ref)->closed) {
        RefObject *r = (RefObject *)ref;
        r->life = (float)(monotonic() - r->born);
        if (queue(PyTuple_Pack(2, tags[EV_GC], ref)) < 0) return NULL;
    }
    Py_RETURN_NONE;
}

/* Parse (a0..a{npos-1}) + optional keywords named names[npos_min..] into out[]. */
static int parse_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, PyObject **out,
                      Py_ssize_t nmin, Py_ssize_t nmax, PyObject **names, const char *fname) {
    if (nargs < nmin || nargs > nmax) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd to %zd arguments (%zd given)", fname, nmin, nmax, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nmax; i++) out[i] = i < nargs ? args[i] : Py_None;
    if (kwnames != NULL) {
        Py_ssize_t nk = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t k = 0; k < nk; k++) {
            PyObject *name = PyTuple_GET_ITEM(kwnames, k);
            Py_ssize_t i;
            for (i = 0; i < nmax; i++) {
                if (names[i] != NULL && PyUnicode_Compare(name, names[i]) == 0) break;
            }
            if (i == nmax || i < nargs) {
                PyErr_Format(PyExc_TypeError, "%s() got an unexpected or repeated argument %R", fname, name);
                return -1;
            }
            out[i] = args[nargs + k];
        }
    }
    return 0;
}

/* Count obj as one live client of kind made at site (borrowed arguments; role, up and res may
   be NULL or None). 0, or -1 with an exception. */
static int track_obj(PyObject *obj, PyObject *kind, PyObject *site, PyObject *role, PyObject *up, PyObject *res) {
    RefObject *ref = (RefObject *)new_ref(obj);
    if (ref == NULL) return -1;
    ref->closed = 0;
    if (role != NULL) SETF(ref->want_role, role);
    if (up != NULL) SETF(ref->want_up, up);
    ref->born = monotonic();
    int rc = queue(PyTuple_Pack(5, tags[EV_TRACK], (PyObject *)ref, kind, site, res != NULL ? res : Py_None));
    Py_DECREF(ref);
    if (rc < 0 || maybe_flush() < 0) return -1;
    PyObject *hook = PyDict_GetItemWithError(reg_globals, s_on_track); /* borrowed */
    if (hook == NULL && PyErr_Occurred()) return -1;
    if (hook != NULL && hook != Py_None) {
        Py_INCREF(hook);
        PyObject *r = PyObject_CallFunctionObjArgs(hook, obj, kind, site, up != NULL ? up : Py_None, NULL);
        Py_DECREF(hook);
        if (r == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_Exception)) return -1;
            report("on_track hook");
        }
        Py_XDECREF(r);
    }
    return 0;
}

static PyObject *sp_track(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    /* track(obj, kind, site, role=None, upstream=None, reservation=None) */
    PyObject *a[6];
    PyObject *names[6] = {NULL, NULL, NULL, s_role, s_upstream, s_reservation};
    if (parse_args(args, nargs, kwnames, a, 3, 6, names, "track") < 0) return NULL;
    if (track_obj(a[0], a[1], a[2], a[3], a[4], a[5]) < 0) return NULL;
    Py_RETURN_NONE;
}

/* Count obj as closed: 1, 0 when it was not tracked (or already released), -1 with an exception. */
static int release_obj(PyObject *obj) {
    RefObject *ref = ref_of(obj);
    if (ref == NULL) return 0;
    ref->closed = 1;
    ref->life = (float)(monotonic() - ref->born);
    if (queue(PyTuple_Pack(2, tags[EV_RELEASE], (PyObject *)ref)) < 0) return -1;
    if (maybe_flush() < 0) return -1;
    return 1;
}

static PyObject *sp_release(PyObject *self, PyObject *obj) {
    /* Count obj as closed; False when it was not tracked (or already released). */
    int rc = release_obj(obj);
    if (rc < 0) return NULL;
    return PyBool_FromLong(rc);
}

/* set_role on obj (borrowed arguments; up and res may be NULL or None): 0, or -1 with an exception. */
static int set_role_obj(PyObject *obj, PyObject *role, PyObject *up, PyObject *res) {
    if (up == NULL) up = Py_None;
    if (res == NULL) res = Py_None;
    RefObject *ref = ref_of(obj);
    if (ref != NULL) {
        SETF(ref->want_role, role);
        SETF(ref->want_up, up);
        /* Not yet applied (the usual case: a socket connects right after it is made): the
           track event reads the wanted role. Otherwise (or with a reservation) an event. */
        if (NN(ref->stat) != NULL || res != Py_None) {
            if (queue(PyTuple_Pack(3, tags[EV_ROLE], (PyObject *)ref, res)) < 0) return -1;
        }
    } else if (res != Py_None) {
        if (queue(PyTuple_Pack(2, tags[EV_UNRESERVE], res)) < 0) return -1;
    }
    return maybe_flush();
}

static PyObject *sp_set_role(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    /* set_role(obj, role, upstream=None, reservation=None) */
    PyObject *a[4];
    PyObject *names[4] = {NULL, s_role, s_upstream, s_reservation};
    if (parse_args(args, nargs, kwnames, a, 2, 4, names, "set_role") < 0) return NULL;
    if (set_role_obj(a[0], a[1], a[2], a[3]) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *sp_ref_of(PyObject *self, PyObject *obj) {
    RefObject *ref = ref_of(obj);
    if (ref == NULL) Py_RETURN_NONE;
    Py_INCREF(ref);
    return (PyObject *)ref;
}

static PyObject *sp_is_tracked(PyObject *self, PyObject *obj) {
    return PyBool_FromLong(ref_of(obj) != NULL);
}

static PyObject *sp_bind(PyObject *self, PyObject *args) {
    PyObject *ev, *st, *tot, *sst, *upc, *rt, *rs, *ru, *fl, *rep, *glob, *mono;
    Py_ssize_t b;
    if (!PyArg_ParseTuple(args, "OO!O!O!O!O!O!O!OOO!On", &ev, &PyDict_Type, &st, &PyList_Type, &tot,
                          &PyDict_Type, &sst, &PyDict_Type, &upc, &PyList_Type, &rt, &PyDict_Type, &rs,
                          &PyDict_Type, &ru, &fl, &rep, &PyDict_Type, &glob, &mono, &b))
        return NULL;
    PyObject *app = PyObject_GetAttrString(ev, "append");
    if (app == NULL) return NULL;
    PyObject *pop = PyObject_GetAttrString(ev, "popleft");
    if (pop == NULL) { Py_DECREF(app); return NULL; }
    Py_XSETREF(ev_append, app);
    Py_XSETREF(ev_popleft, pop);
#define KEEP(var, val) do { Py_INCREF(val); Py_XSETREF(var, val); } while (0)
    KEEP(events, ev); KEEP(stats, st); KEEP(totals, tot); KEEP(site_stats, sst); KEEP(up_counts, upc);
    KEEP(res_total, rt); KEEP(res_site, rs); KEEP(res_up, ru); KEEP(flush_fn, fl); KEEP(report_fn, rep);
    KEEP(reg_globals, glob); KEEP(monotonic_fn, mono);
    batch = b;
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------ */
/* call-site walk                                                                             */

static PyObject *cs_kinds, *cs_sites, *cs_classify, *cs_new_site, *cs_slow, *cs_overflow;
static long cs_user = 0, cs_agent = 3;

static PyObject *sp_bind_callsite(PyObject *self, PyObject *args) {
    PyObject *kinds, *sites, *classify, *new_site, *slow, *overflow;
    long user, agent;
    if (!PyArg_ParseTuple(args, "O!O!OOOOll", &PyDict_Type, &kinds, &PyDict_Type, &sites, &classify, &new_site,
                          &slow, &overflow, &user, &agent))
        return NULL;
    KEEP(cs_kinds, kinds); KEEP(cs_sites, sites); KEEP(cs_classify, classify); KEEP(cs_new_site, new_site);
    KEEP(cs_slow, slow); KEEP(cs_overflow, overflow);
    cs_user = user;
    cs_agent = agent;
    Py_RETURN_NONE;
}

/* Caches in front of the dicts, keyed by code object (kept alive by the entry, so its address
   cannot be reused while cached): the kind of a code's file, and the site of a user frame at
   (code, instruction offset), which saves computing the line number (a scan of the line table).
   Direct-mapped, cleared by clear_caches() whenever _callsite's dicts are. */
#define KIND_CACHE 512
#define SITE_CACHE 1024
typedef struct { PyObject *code; long kind; } KindEntry;
typedef struct { PyObject *code; int lasti; PyObject *site; } SiteEntry;
static KindEntry kind_cache[KIND_CACHE];
static SiteEntry site_cache[SITE_CACHE];

static void clear_code_caches(void) {
    for (int i = 0; i < KIND_CACHE; i++) {
        PyObject *c = kind_cache[i].code;
        kind_cache[i].code = NULL;
        Py_XDECREF(c);
    }
    for (int i = 0; i < SITE_CACHE; i++) {
        PyObject *c = site_cache[i].code, *st = site_cache[i].site;
        site_cache[i].code = site_cache[i].site = NULL;
        Py_XDECREF(c); Py_XDECREF(st);
    }
}

static int frame_lasti(PyFrameObject *f) {
#if PY_VERSION_HEX >= 0x030b0000
    return PyFrame_GetLasti(f);
#else
    return f->f_lasti;
#endif
}

/* The kind of code's file (USER, STDLIB, ...), or -1 with an exception. */
static long code_kind(PyCodeObject *code) {
    uintptr_t h = (uintptr_t)code >> 4;
    KindEntry *e = &kind_cache[(h ^ (h >> 9)) & (KIND_CACHE - 1)];
    if (e->code == (PyObject *)code) return e->kind;
    PyObject *fn = code->co_filename;
    Py_INCREF(fn);
    long kind;
    PyObject *k = PyDict_GetItemWithError(cs_kinds, fn); /* borrowed */
    if (k != NULL) {
        kind = PyLong_AsLong(k);
    } else if (PyErr_Occurred()) {
        kind = -1;
    } else {
        PyObject *kv = PyObject_CallOneArg(cs_classify, fn);
        kind = kv == NULL ? -1 : PyLong_AsLong(kv);
        Py_XDECREF(kv);
    }
    Py_DECREF(fn);
    if (kind == -1 && PyErr_Occurred()) return -1;
    e = &kind_cache[(h ^ (h >> 9)) & (KIND_CACHE - 1)];
    PyObject *old = e->code;
    Py_INCREF(code);
    e->code = (PyObject *)code;
    e->kind = kind;
    Py_XDECREF(old);
    return kind;
}

/* The interned site of a user frame (new reference), or NULL with an exception. */
static PyObject *user_site(PyFrameObject *f, PyCodeObject *code) {
    int lasti = frame_lasti(f);
    uintptr_t h = ((uintptr_t)code >> 4) * 0x9E3779B1u ^ (uintptr_t)lasti;
    SiteEntry *e = &site_cache[(h ^ (h >> 13)) & (SITE_CACHE - 1)];
    if (e->code == (PyObject *)code && e->lasti == lasti) {
        Py_INCREF(e->site);
        return e->site;
    }
    PyObject *key = Py_BuildValue("(Oi)", code->co_filename, PyFrame_GetLineNumber(f));
    if (key == NULL) return NULL;
    PyObject *site = PyDict_GetItemWithError(cs_sites, key);
    Py_DECREF(key);
    if (site != NULL) {
        Py_INCREF(site);
    } else {
        if (PyErr_Occurred()) return NULL;
        site = PyObject_CallFunctionObjArgs(cs_new_site, (PyObject *)f, Py_False, NULL);
        if (site == NULL) return NULL;
    }
    if (site != cs_overflow) { /* the overflow site is not cached: room may come back */
        e = &site_cache[(h ^ (h >> 13)) & (SITE_CACHE - 1)];
        PyObject *oc = e->code, *os = e->site;
        Py_INCREF(code);
        Py_INCREF(site);
        e->code = (PyObject *)code;
        e->lasti = lasti;
        e->site = site;
        Py_XDECREF(oc);
        Py_XDECREF(os);
    }
    return site;
}

static PyObject *sp_clear_caches(PyObject *self, PyObject *unused) {
    clear_code_caches();
    clear_stat_cache();
    Py_RETURN_NONE;
}

/* The call site for a walk that starts at frame f (borrowed; NULL: no frame): a new reference to
   the site, None for the agent's own frames, or NULL with an exception. */
static PyObject *find_from(PyFrameObject *f) {
    if (f == NULL) { Py_INCREF(cs_overflow); return cs_overflow; }
    Py_INCREF(f);
    PyFrameObject *start = f;
    Py_INCREF(start);
    PyObject *result = NULL;
    while (f != NULL) {
        PyCodeObject *code = PyFrame_GetCode(f);
        long kind = code_kind(code);
        if (kind == -1) { Py_DECREF(code); goto out; }
        if (kind == cs_user) {
            result = user_site(f, code);
            Py_DECREF(code);
            goto out;
        }
        Py_DECREF(code);
        if (kind == cs_agent) {
            Py_INCREF(Py_None);
            result = Py_None;
            goto out;
        }
        PyFrameObject *b = PyFrame_GetBack(f);
        Py_DECREF(f);
        f = b;
    }
    /* No user frame: the rare case, decided in Python from the starting frame. */
    result = PyObject_CallOneArg(cs_slow, (PyObject *)start);
out:
    Py_XDECREF(f);
    Py_DECREF(start);
    return result;
}

static PyObject *sp_find(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    /* find(depth=2): as connwatch._callsite.find (depth counted from find's own frame, which a
       C function does not have: the caller's frame is depth 1). */
    long depth = 2;
    if (nargs > 1) { PyErr_SetString(PyExc_TypeError, "find() takes at most 1 argument"); return NULL; }
    if (nargs == 1) {
        depth = PyLong_AsLong(args[0]);
        if (depth == -1 && PyErr_Occurred()) return NULL;
    }
    PyFrameObject *f = PyEval_GetFrame(); /* borrowed */
    Py_XINCREF(f);
    for (long i = 1; i < depth && f != NULL; i++) {
        PyFrameObject *b = PyFrame_GetBack(f);
        Py_DECREF(f);
        f = b;
    }
    PyObject *result = find_from(f);
    Py_XDECREF(f);
    return result;
}

/* ------------------------------------------------------------------------------------------ */
/* the patch wrappers: the same behaviour as connwatch/patches/_common.py's _make_init,        */
/* _make_close and _make_nest and stdlib_socket.py's __init__, _real_close and connect         */
/* wrappers, without a Python frame each (a requests.get() runs about nine of them)            */

enum { W_INIT = 0, W_CLOSE, W_NEST, W_SOCK_INIT, W_SOCK_CLOSE, W_SOCK_CONNECT };
enum { RULE_TRACK = 0, RULE_SKIP = 1, RULE_LIBRARY = 2 };

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    int action;
    PyObject *call;     /* the original */
    PyObject *kind;     /* client kind (str) */
    PyObject *upstream; /* upstream(args[1:], kwargs) -> str | None, or None */
    PyObject *up_cache; /* with up_name: {constructor argument: upstream} tried first, or NULL */
    PyObject *up_name;  /* the keyword name of that argument (at position up_index after self) */
    Py_ssize_t up_index;
    PyObject *rule;     /* rule(frame) -> TRACK | SKIP | LIBRARY, or None */
    PyObject *armed;    /* an object whose .on is False once unpatched, or None (always on) */
    PyObject *where;    /* what an internal error report names */
    PyObject *extra;    /* socket wrappers: see w_sock_init and w_sock_connect */
    PyObject *dict;     /* __dict__ (functools.wraps fills it) */
} WrapperObject;

static PyTypeObject WrapperType;
static Py_tss_t depth_key = Py_tss_NEEDS_INIT; /* wrapped constructors running on this thread */
static PyObject *limits_globals; /* connwatch._limits.__dict__ (its _policy: None = no cap) */
static PyObject *guarded_check_fn, *library_site_fn, *before_connect_fn, *s_policy, *s_on;

static inline intptr_t get_depth(void) { return (intptr_t)PyThread_tss_get(&depth_key); }
static inline void set_depth(intptr_t n) { PyThread_tss_set(&depth_key, (void *)n); }

/* 1 when the wrapper is armed, 0 when not, -1 with an exception. */
static int armed_on(WrapperObject *w) {
    if (w->armed == Py_None) return 1;
    PyObject *on = PyObject_GetAttr(w->armed, s_on);
    if (on == NULL) return -1;
    int r = PyObject_IsTrue(on);
    Py_DECREF(on);
    return r;
}

/* Whether a cap is configured (connwatch._limits._policy is not None). */
static int capped(void) {
    PyObject *p = PyDict_GetItemWithError(limits_globals, s_policy); /* borrowed */
    if (p == NULL) { PyErr_Clear(); return 0; }
    return p != Py_None;
}

/* Give back a reservation (borrowed; None: nothing) whose client was never made, keeping any
   exception being raised. */
static void unreserve_keep(PyObject *res, PyObject *where) {
    if (res == NULL || res == Py_None) return;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (queue(PyTuple_Pack(2, tags[EV_UNRESERVE], res)) < 0) {
        report_obj(where);
    } else {
        PyObject *r = PyObject_CallNoArgs(flush_fn);
        if (r == NULL) report_obj(where);
        Py_XDECREF(r);
    }
    PyErr_Restore(type, value, tb);
}

/* upstream(args[1:], kwargs) for a constructor call; a new reference or NULL with an exception. */
static PyObject *call_upstream(WrapperObject *w, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *pos = PyTuple_New(nargs - 1);
    if (pos == NULL) return NULL;
    for (Py_ssize_t i = 1; i < nargs; i++) {
        Py_INCREF(args[i]);
        PyTuple_SET_ITEM(pos, i - 1, args[i]);
    }
    PyObject *kw = PyDict_New();
    if (kw == NULL) { Py_DECREF(pos); return NULL; }
    if (kwnames != NULL) {
        for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(kwnames); k++) {
            if (PyDict_SetItem(kw, PyTuple_GET_ITEM(kwnames, k), args[nargs + k]) < 0) {
                Py_DECREF(pos); Py_DECREF(kw);
                return NULL;
            }
        }
    }
    PyObject *up = PyObject_CallFunctionObjArgs(w->upstream, pos, kw, NULL);
    Py_DECREF(pos);
    Py_DECREF(kw);
    return up;
}

/* The site to count a new client at (new reference; NULL: none, never with an exception). */
static PyObject *client_site(WrapperObject *w, PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames, PyObject **up) {
    PyObject *site = NULL;
    *up = NULL;
    int on = armed_on(w);
    if (on < 0) goto error;
    if (!on || ref_of(self) != NULL) return NULL; /* __init__ run twice: one client */
    PyFrameObject *f = PyEval_GetFrame(); /* borrowed: the frame that called the constructor */
    long verdict = RULE_TRACK;
    if (w->rule != Py_None) {
        PyObject *v = PyObject_CallOneArg(w->rule, f != NULL ? (PyObject *)f : Py_None);
        if (v == NULL) goto error;
        verdict = PyLong_AsLong(v);
        Py_DECREF(v);
        if (verdict == -1 && PyErr_Occurred()) goto error;
    }
    if (verdict == RULE_TRACK) {
        site = find_from(f);
    } else if (verdict == RULE_LIBRARY) {
        site = PyObject_CallOneArg(library_site_fn, f != NULL ? (PyObject *)f : Py_None);
    } else {
        return NULL;
    }
    if (site == NULL) goto error;
    if (site == Py_None) { Py_DECREF(site); return NULL; }
    if (w->up_cache != NULL) {
        /* The usual case first: the argument that names the upstream, seen before (grpc's
           target): one dict lookup instead of a Python call. A miss takes the general path,
           which fills the cache. */
        PyObject *key = nargs > 1 + w->up_index ? args[1 + w->up_index] : NULL;
        if (key == NULL && kwnames != NULL) {
            for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(kwnames); k++) {
                if (PyUnicode_Compare(PyTuple_GET_ITEM(kwnames, k), w->up_name) == 0) { key = args[nargs + k]; break; }
            }
        }
        if (key != NULL && PyUnicode_CheckExact(key)) {
            PyObject *u = PyDict_GetItemWithError(w->up_cache, key); /* borrowed */
            if (u != NULL) {
                if (u != Py_None) { Py_INCREF(u); *up = u; }
                return site;
            }
            if (PyErr_Occurred()) goto error;
        }
    }
    if (w->upstream != Py_None) {
        PyObject *u = call_upstream(w, args, nargs, kwnames);
        if (u == NULL) goto error;
        if (u == Py_None) Py_DECREF(u);
        else *up = u;
    }
    return site;
error:
    report_obj(w->where);
    Py_XDECREF(site);
    Py_CLEAR(*up);
    return NULL;
}

static PyObject *w_init(WrapperObject *w, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *site = NULL, *up = NULL, *res = NULL, *result;
    intptr_t depth = get_depth();
    if (!capped()) {
        /* No cap: the original first, then the call site (the frames are the same), so the
           agent adds nothing between the app's call and the library's own work. */
        set_depth(depth + 1);
        result = PyObject_Vectorcall(w->call, args, nargsf, kwnames);
        set_depth(get_depth() - 1);
        if (result != NULL && nargs > 0 && depth == 0) {
            site = client_site(w, args[0], args, nargs, kwnames, &up);
            if (site != NULL && track_obj(args[0], w->kind, site, NULL, up, NULL) < 0) report_obj(w->where);
        }
        Py_XDECREF(site);
        Py_XDECREF(up);
        return result;
    }
    if (nargs > 0 && depth == 0) site = client_site(w, args[0], args, nargs, kwnames, &up);
    /* The cap check runs before the original: a refused client opens nothing. */
    if (site != NULL) {
        res = PyObject_CallFunctionObjArgs(guarded_check_fn, w->kind, site, up != NULL ? up : Py_None, NULL);
        if (res == NULL) { Py_DECREF(site); Py_XDECREF(up); return NULL; } /* ClientCapExceeded */
    }
    set_depth(depth + 1);
    result = PyObject_Vectorcall(w->call, args, nargsf, kwnames);
    set_depth(get_depth() - 1);
    if (result == NULL) {
        unreserve_keep(res, w->where);
    } else if (site != NULL) {
        if (track_obj(args[0], w->kind, site, NULL, up, res) < 0) report_obj(w->where);
    }
    Py_XDECREF(site);
    Py_XDECREF(up);
    Py_XDECREF(res);
    return result;
}

/* Release args[0] after a close ran (or raised), keeping any exception being raised. */
static void release_after(WrapperObject *w, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1) return;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    int on = armed_on(w);
    if (on < 0 || (on && release_obj(args[0]) < 0)) report_obj(w->where);
    PyErr_Restore(type, value, tb);
}

static PyObject *w_close(WrapperObject *w, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    PyObject *result = PyObject_Vectorcall(w->call, args, nargsf, kwnames);
    release_after(w, args, PyVectorcall_NARGS(nargsf));
    return result;
}

static PyObject *w_nest(WrapperObject *w, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    set_depth(get_depth() + 1);
    PyObject *result = PyObject_Vectorcall(w->call, args, nargsf, kwnames);
    set_depth(get_depth() - 1);
    return result;
}

/* socket.__init__(self, family=-1, type=-1, proto=-1, fileno=None). extra: the Python function
   after_fileno(self, site) that handles a socket built on an existing descriptor. */
static PyObject *w_sock_init(WrapperObject *w, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    PyObject *result = PyObject_Vectorcall(w->call, args, nargsf, kwnames);
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (result == NULL || nargs < 1) return result;
    PyObject *fileno = nargs > 4 ? args[4] : Py_None;
    if (kwnames != NULL) {
        for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(kwnames); k++) {
            if (PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, k), "fileno") == 0) fileno = args[nargs + k];
        }
    }
    PyObject *site = find_from(PyEval_GetFrame());
    if (site == NULL) goto error;
    if (site != Py_None) {
        if (fileno == Py_None) {
            if (track_obj(args[0], s_socket, site, NULL, NULL, NULL) < 0) { Py_DECREF(site); goto error; }
        } else {
            PyObject *r = PyObject_CallFunctionObjArgs(w->extra, args[0], site, NULL);
            if (r == NULL) { Py_DECREF(site); goto error; }
            Py_DECREF(r);
        }
    }
    Py_DECREF(site);
    return result;
error:
    report_obj(w->where);
    return result;
}

/* socket.connect(self, address). extra: (upstreams cache dict, upstream_of, connected) where
   connected(self, address, reservation) handles a non-blocking connect in progress. */
static PyObject *w_sock_connect(WrapperObject *w, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 2 || kwnames != NULL) return PyObject_Vectorcall(w->call, args, nargsf, kwnames);
    PyObject *self = args[0], *address = args[1];
    PyObject *res = NULL;
    if (capped()) { /* may raise ClientCapExceeded, before the original: a refused client opens nothing */
        res = PyObject_CallFunctionObjArgs(before_connect_fn, self, address, NULL);
        if (res == NULL) return NULL;
    }
    PyObject *result = PyObject_Vectorcall(w->call, args, nargsf, kwnames);
    if (result == NULL) {
        if (PyErr_ExceptionMatches(PyExc_BlockingIOError) || PyErr_ExceptionMatches(PyExc_InterruptedError)) {
            /* a non-blocking connect in progress: a client now */
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyObject *r = PyObject_CallFunctionObjArgs(PyTuple_GET_ITEM(w->extra, 2), self, address,
                                                       res != NULL ? res : Py_None, NULL);
            if (r == NULL) report_obj(w->where);
            Py_XDECREF(r);
            PyErr_Restore(type, value, tb);
        } else {
            unreserve_keep(res, w->where);
        }
        Py_XDECREF(res);
        return NULL;
    }
    PyObject *up = PyDict_GetItemWithError(PyTuple_GET_ITEM(w->extra, 0), address); /* borrowed */
    if (up != NULL) {
        Py_INCREF(up);
    } else {
        PyErr_Clear(); /* a miss, or an unhashable address */
        up = PyObject_CallOneArg(PyTuple_GET_ITEM(w->extra, 1), address);
    }
    if (up == NULL || set_role_obj(self, s_client, up, res) < 0) report_obj(w->where);
    Py_XDECREF(up);
    Py_XDECREF(res);
    return result;
}

static PyObject *w_sock_close(WrapperObject *w, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    PyObject *result = PyObject_Vectorcall(w->call, args, nargsf, kwnames);
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs < 1) return result;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (release_obj(args[0]) < 0) report_obj(w->where);
    PyErr_Restore(type, value, tb);
    return result;
}

static vectorcallfunc w_impl[] = {(vectorcallfunc)w_init, (vectorcallfunc)w_close, (vectorcallfunc)w_nest,
                                  (vectorcallfunc)w_sock_init, (vectorcallfunc)w_sock_close,
                                  (vectorcallfunc)w_sock_connect};

static PyObject *sp_wrapper(PyObject *self, PyObject *args) {
    /* wrapper(action, call, kind, upstream, rule, armed, where, extra); upstream may also be
       (function, (index, name, cache)): see up_cache. */
    int action;
    PyObject *call, *kind, *upstream, *rule, *armed, *where, *extra;
    PyObject *up_cache = NULL, *up_name = NULL;
    Py_ssize_t up_index = 0;
    if (!PyArg_ParseTuple(args, "iOOOOOUO", &action, &call, &kind, &upstream, &rule, &armed, &where, &extra))
        return NULL;
    if (PyTuple_Check(upstream)) {
        PyObject *fn;
        if (!PyArg_ParseTuple(upstream, "O(nUO!)", &fn, &up_index, &up_name, &PyDict_Type, &up_cache)) return NULL;
        if (up_index < 0) { PyErr_SetString(PyExc_ValueError, "wrapper: negative argument index"); return NULL; }
        upstream = fn;
    }
    if (action < 0 || action > W_SOCK_CONNECT) { PyErr_SetString(PyExc_ValueError, "bad wrapper action"); return NULL; }
    if (!PyCallable_Check(call)) { PyErr_SetString(PyExc_TypeError, "wrapper: call is not callable"); return NULL; }
    if (action == W_SOCK_CONNECT && (!PyTuple_Check(extra) || PyTuple_GET_SIZE(extra) != 3 ||
                                     !PyDict_Check(PyTuple_GET_ITEM(extra, 0)))) {
        PyErr_SetString(PyExc_TypeError, "wrapper: connect needs (dict, upstream_of, connected)");
        return NULL;
    }
    WrapperObject *w = PyObject_GC_New(WrapperObject, &WrapperType);
    if (w == NULL) return NULL;
    w->vectorcall = w_impl[action];
    w->action = action;
    Py_INCREF(call); w->call = call;
    Py_INCREF(kind); w->kind = kind;
    Py_INCREF(upstream); w->upstream = upstream;
    Py_XINCREF(up_cache); w->up_cache = up_cache;
    Py_XINCREF(up_name); w->up_name = up_name;
    w->up_index = up_index;
    Py_INCREF(rule); w->rule = rule;
    Py_INCREF(armed); w->armed = armed;
    Py_INCREF(where); w->where = where;
    Py_INCREF(extra); w->extra = extra;
    w->dict = NULL;
    PyObject_GC_Track(w);
    return (PyObject *)w;
}

static int wrapper_traverse(WrapperObject *w, visitproc visit, void *arg) {
    Py_VISIT(w->call); Py_VISIT(w->kind); Py_VISIT(w->upstream); Py_VISIT(w->rule);
    Py_VISIT(w->up_cache); Py_VISIT(w->up_name);
    Py_VISIT(w->armed); Py_VISIT(w->where); Py_VISIT(w->extra); Py_VISIT(w->dict);
    return 0;
}

static int wrapper_clear(WrapperObject *w) {
    Py_CLEAR(w->call); Py_CLEAR(w->kind); Py_CLEAR(w->upstream); Py_CLEAR(w->rule);
    Py_CLEAR(w->up_cache); Py_CLEAR(w->up_name);
    Py_CLEAR(w->armed); Py_CLEAR(w->where); Py_CLEAR(w->extra); Py_CLEAR(w->dict);
    return 0;
}

static void wrapper_dealloc(WrapperObject *w) {
    PyObject_GC_UnTrack(w);
    wrapper_clear(w);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static PyObject *wrapper_call(WrapperObject *w, PyObject *args, PyObject *kwargs) {
    return PyVectorcall_Call((PyObject *)w, args, kwargs);
}

static PyObject *wrapper_get(PyObject *self, PyObject *obj, PyObject *type) {
    /* A method, like a function: bound on an instance, itself on the class. */
    if (obj == NULL || obj == Py_None) { Py_INCREF(self); return self; }
    return PyMethod_New(self, obj);
}

static PyObject *wrapper_repr(WrapperObject *w) {
    PyObject *name = w->dict != NULL ? PyDict_GetItemString(w->dict, "__qualname__") : NULL; /* borrowed */
    if (name != NULL) return PyUnicode_FromFormat("<connwatch wrapper of %S>", name);
    return PyUnicode_FromFormat("<connwatch wrapper of %R>", w->call);
}

static PyGetSetDef wrapper_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef wrapper_members[] = {
    {"_connwatch_call", T_OBJECT, offsetof(WrapperObject, call), READONLY, "the original"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject WrapperType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "connwatch._speedups.Wrapper",
    .tp_basicsize = sizeof(WrapperObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = NULL,
    .tp_traverse = (traverseproc)wrapper_traverse,
    .tp_clear = (inquiry)wrapper_clear,
    .tp_dealloc = (destructor)wrapper_dealloc,
    .tp_vectorcall_offset = offsetof(WrapperObject, vectorcall),
    .tp_call = (ternaryfunc)wrapper_call,
    .tp_descr_get = wrapper_get,
    .tp_repr = (reprfunc)wrapper_repr,
    .tp_getattro = PyObject_GenericGetAttr,
    .tp_setattro = PyObject_GenericSetAttr,
    .tp_dictoffset = offsetof(WrapperObject, dict),
    .tp_getset = wrapper_getset,
    .tp_members = wrapper_members,
};

static PyObject *sp_bind_patches(PyObject *self, PyObject *args) {
    /* bind_patches(limits_globals, guarded_check, library_site, socket_connect_check) */
    PyObject *lg, *gc, *ls, *bc;
    if (!PyArg_ParseTuple(args, "O!OOO", &PyDict_Type, &lg, &gc, &ls, &bc)) return NULL;
    KEEP(limits_globals, lg); KEEP(guarded_check_fn, gc); KEEP(library_site_fn, ls); KEEP(before_connect_fn, bc);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------ */

static PyMethodDef on_collected_def = {"on_collected", (PyCFunction)sp_on_collected, METH_O,
                                       "The weakref callback: queue a collection event."};

static PyMethodDef methods[] = {
    {"bind", sp_bind, METH_VARARGS, "Hand over the registry's containers."},
    {"bind_callsite", sp_bind_callsite, METH_VARARGS, "Hand over the call-site caches."},
    {"track", (PyCFunction)(void (*)(void))sp_track, METH_FASTCALL | METH_KEYWORDS,
     "track(obj, kind, site, role=None, upstream=None, reservation=None)"},
    {"release", sp_release, METH_O, "release(obj) -> bool"},
    {"set_role", (PyCFunction)(void (*)(void))sp_set_role, METH_FASTCALL | METH_KEYWORDS,
     "set_role(obj, role, upstream=None, reservation=None)"},
    {"ref_of", sp_ref_of, METH_O, "The live (not released) Ref of obj, or None."},
    {"is_tracked", sp_is_tracked, METH_O, "Whether obj is counted as live."},
    {"drain", sp_drain, METH_NOARGS, "Apply the queued events (registry lock held)."},
    {"find", (PyCFunction)(void (*)(void))sp_find, METH_FASTCALL, "find(depth=2): the call site."},
    {"clear_caches", sp_clear_caches, METH_NOARGS, "Forget the cached kinds, sites and stats."},
    {"wrapper", sp_wrapper, METH_VARARGS, "wrapper(action, call, kind, upstream, rule, armed, where, extra)"},
    {"bind_patches", sp_bind_patches, METH_VARARGS, "Hand over what the patch wrappers call."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT, "connwatch._speedups", "C hot path of connwatch (see _registry.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__speedups(void) {
    RefType.tp_base = &_PyWeakref_RefType;
    if (PyType_Ready(&RefType) < 0 || PyType_Ready(&StatType) < 0 || PyType_Ready(&WrapperType) < 0) return NULL;
    PyObject *m = PyModule_Create(&speedups_module);
    if (m == NULL) return NULL;
    s_on_track = PyUnicode_InternFromString("on_track");
    s_socket = PyUnicode_InternFromString("socket");
    s_client = PyUnicode_InternFromString("client");
    s_role = PyUnicode_InternFromString("role");
    s_upstream = PyUnicode_InternFromString("upstream");
    s_reservation = PyUnicode_InternFromString("reservation");
    s_policy = PyUnicode_InternFromString("_policy");
    s_on = PyUnicode_InternFromString("on");
    if (PyThread_tss_create(&depth_key) != 0) { Py_DECREF(m); PyErr_NoMemory(); return NULL; }
    APPLYING = PyObject_CallNoArgs((PyObject *)&PyBaseObject_Type);
    for (int i = 0; i < 6; i++) if ((tags[i] = PyLong_FromLong(i)) == NULL) { Py_DECREF(m); return NULL; }
    on_collected = PyCFunction_NewEx(&on_collected_def, NULL, NULL);
    if (!s_on_track || !s_socket || !s_client || !s_role || !s_upstream || !s_reservation || !APPLYING || !s_policy || !s_on ||
        !on_collected) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&RefType);
    Py_INCREF(&StatType);
    Py_INCREF(&WrapperType);
    if (PyModule_AddObject(m, "Wrapper", (PyObject *)&WrapperType) < 0 ||
        PyModule_AddObject(m, "Ref", (PyObject *)&RefType) < 0 ||
        PyModule_AddObject(m, "Stat", (PyObject *)&StatType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(on_collected);
    if (PyModule_AddObject(m, "on_collected", on_collected) < 0) { Py_DECREF(m); return NULL; }
    return m;
}
