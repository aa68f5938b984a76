/* Decode only a rectangle of a JPEG, with libjpeg-turbo's partial-decode calls.

   The paper's training crop covers about 20-80% of the image: decoding the whole image and
   throwing the rest away is the largest cost in the CPU input pipeline. libjpeg-turbo can skip
   the rows above and below (jpeg_skip_scanlines: no IDCT, no colour conversion) and the columns
   left and right (jpeg_crop_scanline), which takes about a quarter off a paper transform.

   One function, called from orchestrator/data/transforms.py (which falls back to a full decode
   when this module is not built, or when it refuses an image):

       decode_region(data, k, left, top, right, bottom) -> (bytearray, x0, width)

   decodes rows [top, bottom) of the image scaled by 1/k (k in 1, 2, 4, 8: DCT-domain scaling)
   as packed RGB, columns [x0, x0 + width), a span that covers [left, right) (libjpeg widens it
   to a whole block on the left). Any libjpeg warning (corrupt or truncated data) is an error:
   ValueError, like simplejpeg's strict mode, so a damaged sample never comes back half grey.
   Rows below the box are never read, so damage there goes unnoticed: the pixels returned are
   intact, and the ImageNet converter decodes every JPEG to its last row (at 1/8 scale) when
   it writes a shard.

   Built at install time where libjpeg's headers are present (setup.py marks it optional). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>

#include <jpeglib.h>

struct region_error {
    struct jpeg_error_mgr pub;
    jmp_buf escape;
    char message[JMSG_LENGTH_MAX];
};

static void fail(j_common_ptr cinfo) {
    struct region_error *err = (struct region_error *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->escape, 1);
}

static void warn_is_error(j_common_ptr cinfo, int level) {
    if (level < 0) fail(cinfo); /* a warning: corrupt data; trace messages (level >= 0) pass */
}

static PyObject *decode_region(PyObject *self, PyObject *args) {
    Py_buffer data;
    int k, left, top, right, bottom;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*iiiii", &data, &k, &left, &top, &right, &bottom)) return NULL;
    if (!(k == 1 || k == 2 || k == 4 || k == 8) || left < 0 || top < 0 || right <= left ||
        bottom <= top) {
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "decode_region: bad box (%d, %d, %d, %d) or k %d",
                            left, top, right, bottom, k);
    }

    struct jpeg_decompress_struct cinfo;
    struct region_error err;
    /* volatile: assigned after setjmp and read after a longjmp back to it */
    PyObject *volatile out = NULL;
    volatile int ok = 0;
    JDIMENSION x0 = (JDIMENSION)left, width = (JDIMENSION)(right - left);
    err.message[0] = '\0';
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = fail;
    err.pub.emit_message = warn_is_error;
    jpeg_create_decompress(&cinfo);

    /* the GIL is held only to allocate the output; no Python call happens inside setjmp's scope
       while it is released */
    PyThreadState *volatile released = PyEval_SaveThread();
    if (setjmp(err.escape)) goto done;
    jpeg_mem_src(&cinfo, (const unsigned char *)data.buf, (unsigned long)data.len);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.jpeg_color_space != JCS_YCbCr && cinfo.jpeg_color_space != JCS_GRAYSCALE &&
        cinfo.jpeg_color_space != JCS_RGB) {
        snprintf(err.message, sizeof err.message, "colour space %d (CMYK?) is not handled here",
                 (int)cinfo.jpeg_color_space);
        goto done;
    }
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)k;
    jpeg_start_decompress(&cinfo);
    if ((JDIMENSION)right > cinfo.output_width || (JDIMENSION)bottom > cinfo.output_height) {
        snprintf(err.message, sizeof err.message, "box beyond the %ux%u decoded image",
                 cinfo.output_width, cinfo.output_height);
        goto done;
    }
    jpeg_crop_scanline(&cinfo, &x0, &width);

    PyEval_RestoreThread(released);
    out = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(bottom - top) * width * 3);
    released = PyEval_SaveThread();
    if (out == NULL) goto done;

    if (top > 0 && jpeg_skip_scanlines(&cinfo, (JDIMENSION)top) != (JDIMENSION)top) {
        snprintf(err.message, sizeof err.message, "could not skip to row %d", top);
        goto done;
    }
    unsigned char *pixels = (unsigned char *)PyByteArray_AS_STRING(out);
    size_t stride = (size_t)width * 3;
    for (int row = 0; row < bottom - top;) {
        JSAMPROW at = pixels + (size_t)row * stride;
        JDIMENSION got = jpeg_read_scanlines(&cinfo, &at, 1);
        if (got == 0) {
            snprintf(err.message, sizeof err.message, "no data at row %d", top + row);
            goto done;
        }
        row += (int)got;
    }
    ok = 1;

done:
    jpeg_destroy_decompress(&cinfo);
    PyEval_RestoreThread(released);
    PyBuffer_Release(&data);
    if (ok) return Py_BuildValue("(NII)", out, x0, width);
    Py_XDECREF(out);
    if (!PyErr_Occurred())
        PyErr_Format(PyExc_ValueError, "decode_region: %s", err.message[0] ? err.message : "failed");
    return NULL;
}

static PyMethodDef methods[] = {
    {"decode_region", decode_region, METH_VARARGS,
     "decode_region(data, k, left, top, right, bottom) -> (bytearray, x0, width): rows "
     "[top, bottom) of the image scaled 1/k as packed RGB, columns [x0, x0 + width) covering "
     "[left, right). ValueError on corrupt data or an image this decoder does not handle."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_jpeg_region", .m_size = -1, .m_methods = methods};

PyMODINIT_FUNC PyInit__jpeg_region(void) { return PyModule_Create(&module); }
