/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * LD_PRELOAD shim that lets Debian's C xenstored (xen-utils-4.17,
 * /usr/lib/xen-4.17/bin/xenstored) run on a machine without a hypervisor,
 * as the store of the "sim" platform (docs: shared spec sim-platform.md,
 * section Xenstore).
 *
 * xenstored serves Unix-socket clients without any hypervisor help, but at
 * start-up it insists on being dom0's store: domain_init() opens libxenctrl,
 * libxengnttab and libxenevtchn and binds VIRQ_DOM_EXC; dom0_init() reads
 * /proc/xen/xsd_port, mmaps /proc/xen/xsd_kva as dom0's ring and binds an
 * interdomain channel to it. Only that path creates the node database, so
 * "-D/--no-domain-init" is no way out (and it leaves xc_handle NULL, which
 * later permission checks dereference).
 *
 * This library defines exactly the hypervisor-facing functions the daemon
 * imports; a preloaded object wins symbol lookup over the real libraries,
 * which are still loaded (DT_NEEDED) but never reached. Our definitions are
 * unversioned, and glibc binds a versioned reference (e.g.
 * xenevtchn_open@VERS_1.0) to an unversioned definition.
 *
 * The stand-ins model a quiet hypervisor:
 *  - every domain id below DOMID_FIRST_RESERVED exists and is running, so
 *    permissions naming any guest are accepted (sim guests are separate
 *    processes whose lifetime xenstored cannot observe);
 *  - the event channel fd never becomes readable: no VIRQ_DOM_EXC, and no
 *    ring doorbells (sim clients all use the socket);
 *  - dom0's ring (xsd_kva) and any ring mapped by XS_INTRODUCE are private
 *    zeroed pages that nobody else writes, so those connections stay idle.
 *
 * Written from scratch against the public headers; nothing here is copied
 * from Xen.
 */

/* Meson builds with _FILE_OFFSET_BITS=64, which makes <fcntl.h> rename open
 * to open64; we define both entry points ourselves, so keep their names. */
#undef _FILE_OFFSET_BITS

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <xenctrl.h>
#include <xenevtchn.h>
#include <xengnttab.h>

#define SHIM_EXPORT __attribute__((visibility("default")))

/* What dom0_init() reads from xsd_port: any valid local port will do, since
 * xenevtchn_bind_interdomain() below accepts every port. */
#define SHIM_XSD_PORT_TEXT "1\n"

#define SHIM_PAGE_SIZE 4096

/* ---------------------------------------------------------------------- */
/* /proc/xen/xsd_port and /proc/xen/xsd_kva                               */
/* ---------------------------------------------------------------------- */

/* An anonymous in-memory file holding `len` bytes of `data` (or zeros when
 * data is NULL), positioned at offset 0. memfd supports both read() (for
 * xsd_port) and mmap(MAP_SHARED) (for xsd_kva), like the real proc files. */
static int shim_memfd(const char *name, const void *data, size_t len, int flags)
{
	int fd = memfd_create(name, (flags & O_CLOEXEC) ? MFD_CLOEXEC : 0);
	if (fd < 0)
		return -1;
	if (ftruncate(fd, (off_t)len) != 0)
		goto fail;
	if (data && pwrite(fd, data, len, 0) != (ssize_t)len)
		goto fail;
	return fd;
fail:
	{
		int err = errno;
		close(fd);
		errno = err;
	}
	return -1;
}

/* Returns a substitute fd for the two proc files, or -2 for any other path. */
static int shim_proc_xen(const char *path, int flags)
{
	if (path == NULL)
		return -2;
	if (strcmp(path, "/proc/xen/xsd_port") == 0)
		return shim_memfd("xsd_port", SHIM_XSD_PORT_TEXT,
				  sizeof(SHIM_XSD_PORT_TEXT) - 1, flags);
	if (strcmp(path, "/proc/xen/xsd_kva") == 0)
		return shim_memfd("xsd_kva", NULL, SHIM_PAGE_SIZE, flags);
	return -2;
}

typedef int (*shim_open_fn)(const char *, int, ...);

static int shim_forward_open(const char *sym, const char *path, int flags,
			     mode_t mode)
{
	void *sym_addr = dlsym(RTLD_NEXT, sym);
	shim_open_fn real;

	if (sym_addr == NULL) {
		errno = ENOSYS;
		return -1;
	}
	/* ISO C has no object-to-function pointer cast; POSIX guarantees the
	 * representations agree, so copy the bits. */
	memcpy(&real, &sym_addr, sizeof(real));
	return real(path, flags, mode);
}

/* open() is variadic: the mode is only present with O_CREAT/O_TMPFILE. */
#define SHIM_OPEN_MODE(flags, ap, mode)                                  \
	do {                                                             \
		if ((flags) & (O_CREAT | O_TMPFILE)) {                   \
			va_start(ap, flags);                             \
			mode = (mode_t)va_arg(ap, int);                  \
			va_end(ap);                                      \
		}                                                        \
	} while (0)

/* xenbus_evtchn() and xenbus_map() use plain open(); open64 is the same
 * entry on LP64 and covered in case a rebuild of the daemon picks it. */
SHIM_EXPORT int open(const char *path, int flags, ...)
{
	mode_t mode = 0;
	va_list ap;
	int fd;

	SHIM_OPEN_MODE(flags, ap, mode);
	fd = shim_proc_xen(path, flags);
	return fd != -2 ? fd : shim_forward_open("open", path, flags, mode);
}

SHIM_EXPORT int open64(const char *path, int flags, ...)
{
	mode_t mode = 0;
	va_list ap;
	int fd;

	SHIM_OPEN_MODE(flags, ap, mode);
	fd = shim_proc_xen(path, flags);
	return fd != -2 ? fd : shim_forward_open("open64", path, flags, mode);
}

/* ---------------------------------------------------------------------- */
/* libxenctrl: only used to ask whether a domain exists                   */
/* ---------------------------------------------------------------------- */

/* xc_interface is opaque to the daemon; it only needs a non-NULL handle. */
static char shim_xc_handle;

SHIM_EXPORT xc_interface *xc_interface_open(xentoollog_logger *logger,
					    xentoollog_logger *dombuild_logger,
					    unsigned open_flags)
{
	(void)logger;
	(void)dombuild_logger;
	(void)open_flags;
	return (xc_interface *)&shim_xc_handle;
}

SHIM_EXPORT int xc_interface_close(xc_interface *xch)
{
	(void)xch;
	return 0;
}

/*
 * Xen returns the first existing domains with id >= first_domid. Here every
 * id below DOMID_FIRST_RESERVED exists, is running and never dies; the daemon
 * asks this to accept permissions naming a guest (unknown ids are otherwise
 * refused with ENOENT) and to decide when a domain's nodes are orphaned.
 */
SHIM_EXPORT int xc_domain_getinfo(xc_interface *xch, uint32_t first_domid,
				  unsigned int max_doms, xc_dominfo_t *info)
{
	unsigned int n = 0;

	(void)xch;
	if (info == NULL) {
		errno = EINVAL;
		return -1;
	}
	for (uint32_t d = first_domid; n < max_doms && d < DOMID_FIRST_RESERVED;
	     d++, n++) {
		memset(&info[n], 0, sizeof(info[n]));
		info[n].domid = d;
		info[n].running = 1;
	}
	return (int)n;
}

/* ---------------------------------------------------------------------- */
/* libxenevtchn: a channel that never fires                               */
/* ---------------------------------------------------------------------- */

/* The daemon polls xenevtchn_fd(); an eventfd nobody signals gives it a real
 * pollable fd that stays silent. Ports are handed out from a counter so each
 * bind gets a distinct local port, as the kernel driver would. */
struct xenevtchn_handle {
	int fd;
	evtchn_port_t next_port;
};

static xenevtchn_handle *shim_evtchn_new(int fd)
{
	xenevtchn_handle *h = calloc(1, sizeof(*h));
	if (h == NULL)
		return NULL;
	h->fd = fd;
	h->next_port = 1;
	return h;
}

SHIM_EXPORT xenevtchn_handle *xenevtchn_open(struct xentoollog_logger *logger,
					     unsigned int flags)
{
	xenevtchn_handle *h;
	int fd;

	(void)logger;
	fd = eventfd(0, EFD_NONBLOCK |
			    ((flags & XENEVTCHN_NO_CLOEXEC) ? 0 : EFD_CLOEXEC));
	if (fd < 0)
		return NULL;
	h = shim_evtchn_new(fd);
	if (h == NULL)
		close(fd);
	return h;
}

/* Used by live update to adopt the old daemon's fd: keep it as is. */
SHIM_EXPORT xenevtchn_handle *xenevtchn_fdopen(struct xentoollog_logger *logger,
					       int fd, unsigned int flags)
{
	(void)logger;
	(void)flags;
	return shim_evtchn_new(fd);
}

SHIM_EXPORT int xenevtchn_close(xenevtchn_handle *xce)
{
	if (xce == NULL)
		return 0;
	close(xce->fd);
	free(xce);
	return 0;
}

SHIM_EXPORT int xenevtchn_fd(xenevtchn_handle *xce)
{
	return xce->fd;
}

static xenevtchn_port_or_error_t shim_evtchn_bind(xenevtchn_handle *xce)
{
	return (xenevtchn_port_or_error_t)xce->next_port++;
}

SHIM_EXPORT xenevtchn_port_or_error_t
xenevtchn_bind_virq(xenevtchn_handle *xce, unsigned int virq)
{
	(void)virq;
	return shim_evtchn_bind(xce);
}

SHIM_EXPORT xenevtchn_port_or_error_t
xenevtchn_bind_interdomain(xenevtchn_handle *xce, uint32_t domid,
			   evtchn_port_t remote_port)
{
	(void)domid;
	(void)remote_port;
	return shim_evtchn_bind(xce);
}

SHIM_EXPORT int xenevtchn_unbind(xenevtchn_handle *xce, evtchn_port_t port)
{
	(void)xce;
	(void)port;
	return 0;
}

/* Doorbells to the idle rings go nowhere. */
SHIM_EXPORT int xenevtchn_notify(xenevtchn_handle *xce, evtchn_port_t port)
{
	(void)xce;
	(void)port;
	return 0;
}

/* Only called once the fd polls readable, which never happens; answer like
 * the driver with nothing pending rather than invent a port. */
SHIM_EXPORT xenevtchn_port_or_error_t xenevtchn_pending(xenevtchn_handle *xce)
{
	(void)xce;
	errno = EAGAIN;
	return -1;
}

SHIM_EXPORT int xenevtchn_unmask(xenevtchn_handle *xce, evtchn_port_t port)
{
	(void)xce;
	(void)port;
	return 0;
}

/* ---------------------------------------------------------------------- */
/* libxengnttab: rings of introduced domains                              */
/* ---------------------------------------------------------------------- */

/* XS_INTRODUCE maps the guest's xenstore ring (grant ref 1). Sim guests talk
 * to the daemon over the socket, so a private zeroed page is a ring that
 * stays empty; the introduction itself (and @introduceDomain) still works. */
static char shim_gnttab_handle;

SHIM_EXPORT xengnttab_handle *xengnttab_open(struct xentoollog_logger *logger,
					     unsigned open_flags)
{
	(void)logger;
	(void)open_flags;
	return (xengnttab_handle *)&shim_gnttab_handle;
}

SHIM_EXPORT int xengnttab_close(xengnttab_handle *xgt)
{
	(void)xgt;
	return 0;
}

SHIM_EXPORT int xengnttab_set_max_grants(xengnttab_handle *xgt, uint32_t nr_grants)
{
	(void)xgt;
	(void)nr_grants;
	return 0;
}

SHIM_EXPORT void *xengnttab_map_grant_ref(xengnttab_handle *xgt, uint32_t domid,
					  uint32_t ref, int prot)
{
	void *page;

	(void)xgt;
	(void)domid;
	(void)ref;
	page = mmap(NULL, SHIM_PAGE_SIZE, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	return page == MAP_FAILED ? NULL : page;
}

SHIM_EXPORT int xengnttab_unmap(xengnttab_handle *xgt, void *start_address,
				uint32_t count)
{
	(void)xgt;
	return munmap(start_address, (size_t)count * SHIM_PAGE_SIZE);
}
